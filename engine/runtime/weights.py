"""Loading an engine directory's rank file into a model, with errors that name the problem."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from engine.errors import EngineLoadError


def rank_file(engine_dir: str | Path, rank: int) -> Path:
    return Path(engine_dir) / f"rank{rank}.safetensors"


def load_rank_weights(model: nn.Module, engine_dir: str | Path, rank: int) -> None:
    """Copy every tensor of `rank{rank}.safetensors` into the same-named parameter of `model`.

    The file must hold exactly the model's parameters with exactly their shapes; dtypes are
    converted to the parameter's dtype.
    """
    path = rank_file(engine_dir, rank)
    if not path.is_file():
        raise EngineLoadError(f"{path}: missing rank file (the engine is incomplete; rebuild it)")
    params = dict(model.named_parameters())
    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            missing = sorted(set(params) - names)
            unexpected = sorted(names - set(params))
            if missing:
                raise EngineLoadError(f"{path}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
            if unexpected:
                raise EngineLoadError(
                    f"{path}: unexpected tensor(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
                    "(engine built for another configuration?)"
                )
            for name, param in params.items():
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != tuple(param.shape):
                    raise EngineLoadError(
                        f"{path}: tensor {name} has shape {tuple(tensor.shape)}, config.json implies "
                        f"{tuple(param.shape)}"
                    )
                with torch.no_grad():
                    param.copy_(tensor)
    except SafetensorError as exc:
        raise EngineLoadError(f"{path}: not a valid safetensors file ({exc})") from None
