"""Reading NVIDIA ModelOpt's unified Hugging Face checkpoint (`hf_quant_config.json`) into Kiln
engine tensors.

ModelOpt 0.47 exports (per quantized linear `X`, HF names):

| quant_algo            | `X.weight`                 | `X.weight_scale`  | other                          |
|-----------------------|----------------------------|-------------------|--------------------------------|
| FP8                   | float8_e4m3fn (out, in)    | scalar            | `X.input_scale` (static)       |
| W8A16                 | int8 (out, in)             | (out,)            |                                |
| W8A8_SQ_PER_CHANNEL   | int8 (out, in)             | (out,)            | `X.pre_quant_scale` (in,), `X.input_scale` |
| W4A16_AWQ / W4A16     | uint8 (out/2, in), row 2i  | (out, in/group)   | `X.pre_quant_scale` (in,) where |
|                       | in the low nibble          |                   | not folded into the norm        |

Kiln fuses q/k/v and gate/up as for float checkpoints and re-lays each weight out for its
kernels (`engine/quant/kernels.py`): per-tensor FP8 scales become per-row scales (so fused
projections keep each part's scale), INT4 is repacked along the input dimension. Static
activation scales (`input_scale`) are not used: Kiln quantizes activations dynamically.
ModelOpt leaves the vocab tables unquantized; with `quant.embedding == "int8"` Kiln quantizes
them itself (`embed_tokens.weight` / `lm_head.weight` int8 (V, H) + `weight_scale` (V,), per row,
round to nearest).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from engine.config import ModelConfig, QuantConfig
from engine.errors import CheckpointError
from engine.quant import kernels

QUANT_CONFIG_FILE = "hf_quant_config.json"
# ModelOpt `quant_algo` -> Kiln algo.
MODELOPT_ALGOS: dict[str, str] = {
    "FP8": "fp8",
    "W8A16": "int8_wo",
    "W8A8_SQ_PER_CHANNEL": "w8a8_sq",
    "W4A16_AWQ": "int4_awq",
    "W4A16": "int4_awq",  # ModelOpt's INT4 blockwise round-to-nearest: the same layout, no AWQ scales
}
LINEAR_SUFFIXES = ("qkv_proj.weight", "o_proj.weight", "gate_up_proj.weight", "down_proj.weight")
VOCAB_TABLES = ("embed_tokens.weight", "lm_head.weight")


def is_modelopt_checkpoint(path: str | Path) -> bool:
    return (Path(path) / QUANT_CONFIG_FILE).is_file()


def read_modelopt_quant_config(path: str | Path) -> QuantConfig:
    """Kiln's QuantConfig of a ModelOpt checkpoint directory (CheckpointError naming the file)."""
    file = Path(path) / QUANT_CONFIG_FILE
    try:
        raw = json.loads(file.read_text())
        q = raw["quantization"]
        algo = q["quant_algo"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{file}: not a ModelOpt quantization config ({exc})") from None
    if algo not in MODELOPT_ALGOS:
        raise CheckpointError(
            f"{file}: quant_algo {algo!r} is not supported by Kiln (supported: {sorted(MODELOPT_ALGOS)})"
        )
    kiln_algo = MODELOPT_ALGOS[algo]
    group = int(q.get("group_size") or 128) if kiln_algo == "int4_awq" else None
    if q.get("has_zero_point"):
        raise CheckpointError(f"{file}: asymmetric (zero-point) INT4 is not supported")
    excluded = q.get("exclude_modules") or []
    extra: dict[str, Any] = {"modelopt_quant_algo": algo, "exclude_modules": excluded}
    return QuantConfig(algo=kiln_algo, group_size=group, extra=extra)


def quantized_shapes(model: ModelConfig, quant: QuantConfig) -> dict[str, tuple[int, ...]]:
    """Shapes (tp=1) of the extra / changed tensors of each quantized linear, keyed by Kiln name."""
    from engine.build.transforms import expected_shapes

    plain = expected_shapes(model)
    shapes: dict[str, tuple[int, ...]] = {}
    for name, (out, cols) in ((n, s) for n, s in plain.items() if n.endswith(LINEAR_SUFFIXES)):
        base = name[: -len("weight")]
        if quant.algo == "int4_awq":
            shapes[name] = (out, cols // 2)
            shapes[base + "weight_scale"] = (out, cols // (quant.group_size or 128))
        else:
            shapes[name] = (out, cols)
            shapes[base + "weight_scale"] = (out,)
        if quant.algo in ("int4_awq", "w8a8_sq"):
            shapes[base + "pre_quant_scale"] = (cols,)
    if quant.embedding == "int8":
        for name in VOCAB_TABLES:
            if name in plain:
                shapes[name[: -len("weight")] + "weight_scale"] = (plain[name][0],)
    return shapes


def _same_pre_quant_scale(tensors: list[torch.Tensor], where: str) -> torch.Tensor:
    first = tensors[0]
    for t in tensors[1:]:
        if not torch.equal(t, first):
            raise CheckpointError(
                f"{where}: fused projections have different pre_quant_scale tensors; re-export with ModelOpt "
                "(export_hf_checkpoint resmooths layers that share an input)"
            )
    return first


def _linear(
    name: str, sources: tuple[str, ...], quant: QuantConfig, dtype: torch.dtype,
    load: Callable[[str], torch.Tensor], available: set[str],
) -> Iterator[tuple[str, torch.Tensor]]:
    """The Kiln tensors of one (possibly fused) quantized linear layer."""
    prefixes = [s[: -len(".weight")] for s in sources]
    base = name[: -len("weight")]
    weights = [load(p + ".weight") for p in prefixes]
    scales = [load(p + ".weight_scale").float() for p in prefixes]
    if quant.algo == "fp8":
        if any(w.dtype != torch.float8_e4m3fn for w in weights):
            raise CheckpointError(f"{prefixes[0]}.weight: expected float8_e4m3fn for FP8, got {weights[0].dtype}")
        rows = [s.expand(w.shape[0]) if s.numel() == 1 else s.reshape(w.shape[0]) for w, s in zip(weights, scales, strict=True)]
        yield name, torch.cat(weights, dim=0)
        yield base + "weight_scale", torch.cat(rows).contiguous()
    elif quant.algo in ("int8_wo", "w8a8_sq"):
        if any(w.dtype != torch.int8 for w in weights):
            raise CheckpointError(f"{prefixes[0]}.weight: expected int8, got {weights[0].dtype}")
        yield name, torch.cat(weights, dim=0)
        yield base + "weight_scale", torch.cat([s.reshape(-1) for s in scales])
    else:  # int4_awq
        if any(w.dtype != torch.uint8 for w in weights):
            raise CheckpointError(f"{prefixes[0]}.weight: expected packed uint8 INT4, got {weights[0].dtype}")
        q = torch.cat([kernels.unpack_modelopt_int4(w) for w in weights], dim=0)
        yield name, kernels.pack_int4(q)
        yield base + "weight_scale", torch.cat(scales, dim=0).contiguous()
    if quant.algo in ("int4_awq", "w8a8_sq"):
        present = [p + ".pre_quant_scale" for p in prefixes if p + ".pre_quant_scale" in available]
        if present and len(present) != len(prefixes):
            raise CheckpointError(f"{prefixes[0]}: only some fused projections have a pre_quant_scale")
        if present:
            pqs = _same_pre_quant_scale([load(p) for p in present], prefixes[0])
        else:  # folded into the preceding norm by ModelOpt
            pqs = torch.ones(weights[0].shape[1])
        yield base + "pre_quant_scale", pqs.to(dtype)


def consumed_extras(prefixes: list[str]) -> set[str]:
    return {p + suffix for p in prefixes for suffix in (".weight_scale", ".pre_quant_scale", ".input_scale")}


def iter_quantized_kiln_tensors(
    architecture: str, model: ModelConfig, quant: QuantConfig, dtype: torch.dtype,
    load: Callable[[str], torch.Tensor], available: set[str],
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(kiln_name, tensor)` for a ModelOpt checkpoint: float tensors in `dtype`, quantized
    linears in Kiln's layouts (scales float32). Raises CheckpointError for missing, unexpected or
    mis-shaped tensors."""
    from engine.build.transforms import expected_shapes, ignored_sources, plan

    planned = plan(architecture, model)
    linear_prefixes = [s[: -len(".weight")] for p in planned if p.name.endswith(LINEAR_SUFFIXES) for s in p.sources]
    required = {s for p in planned for s in p.sources} | {p + ".weight_scale" for p in linear_prefixes}
    missing = sorted(required - available)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"tensor {missing[0]!r} is missing from the ModelOpt checkpoint{more}")
    unused = sorted(available - required - consumed_extras(linear_prefixes) - ignored_sources(model))
    if unused:
        raise CheckpointError(f"ModelOpt checkpoint has tensors Kiln does not use: {unused[:4]}")
    shapes = {**expected_shapes(model), **quantized_shapes(model, quant)}
    for p in planned:
        if p.name.endswith(LINEAR_SUFFIXES):
            produced = _linear(p.name, p.sources, quant, dtype, load, available)
        elif p.name in VOCAB_TABLES and quant.embedding == "int8":
            q, scale = kernels.quantize_rows_int8(p.fuse(*(load(s) for s in p.sources)))
            produced = iter([(p.name, q), (p.name[: -len("weight")] + "weight_scale", scale)])
        else:
            produced = iter([(p.name, p.fuse(*(load(s) for s in p.sources)).to(dtype))])
        for name, tensor in produced:
            if tuple(tensor.shape) != shapes[name]:
                raise CheckpointError(
                    f"tensor {name!r} (from {list(p.sources)}) has shape {tuple(tensor.shape)}, "
                    f"config.json and {QUANT_CONFIG_FILE} imply {shapes[name]}"
                )
            yield name, tensor
