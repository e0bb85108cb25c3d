"""Loading an engine directory's rank file into a model, with errors that name the problem."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from engine.config import ModelConfig
from engine.errors import EngineLoadError

PROMPT_TABLE_FILE = "prompt_table.safetensors"


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


def load_prompt_table(engine_dir: str | Path, model: ModelConfig) -> dict[str, torch.Tensor]:
    """Virtual-token embeddings of the engine's prompt-tuned tasks: {task: (V, hidden)}.
    Empty when the engine has no `prompt_table.safetensors`."""
    path = Path(engine_dir) / PROMPT_TABLE_FILE
    if not path.is_file():
        return {}
    table: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                if tensor.dim() != 2 or tensor.shape[1] != model.hidden_size or tensor.shape[0] == 0:
                    raise EngineLoadError(
                        f"{path}: task {name!r} has shape {tuple(tensor.shape)}, expected (num_virtual_tokens, "
                        f"{model.hidden_size})"
                    )
                table[name] = tensor
    except SafetensorError as exc:
        raise EngineLoadError(f"{path}: not a valid safetensors file ({exc})") from None
    return table
