"""Tensor-parallel split rules: one unsharded Kiln tensor -> the slice rank `r` of `N` holds.

The rules mirror the parallel layers of `engine/model/layers.py` (Megatron-style):

=====================================  ==========================================================
tensor (Kiln name)                     rank r of N holds
=====================================  ==========================================================
``embed_tokens`` / ``lm_head``         rows [r*s, (r+1)*s) of the vocab padded with zero rows to
                                       N*s, s = ceil(V/N) (vocab-parallel)
``self_attn.qkv_proj``                 its query heads [r*nq/N, (r+1)*nq/N) followed by its K and
                                       V heads: nkv/N each when nkv >= N, else the one KV head its
                                       query heads attend to (KV head r*nkv//N, replicated on
                                       N/nkv ranks; MQA included)
``mlp.gate_up_proj``                   [gate_r; up_r]: rows r of gate then rows r of up
``self_attn.o_proj``, ``mlp.down_proj``  columns r of N (row-parallel; partial sums all-reduced)
norms, q/k norms                       everything (replicated)
=====================================  ==========================================================

Rules apply to every tensor of a module, not only `.weight` (Kiln's quantized layouts,
engine/quant/kernels.py: weight (out, in) or INT4 (out, in/2) packed along the input,
weight_scale (out,) or INT4 (out, in/group), pre_quant_scale (in,)):
- column-parallel layers (qkv_proj, gate_up_proj): weight, bias and weight_scale split along
  dim 0 like the weight's rows (so (out, in/2) and (out, in/group) work too); pre_quant_scale
  (in,) is replicated (every rank sees the whole input);
- vocab layers (embed_tokens, lm_head): every tensor (a quantized embedding's int8 (V, H) or
  int4 (V, H/2) weight, its (V,) or (V, H/group) scales) splits by vocab rows, zero-padded;
- row-parallel layers (o_proj, down_proj): 2-D tensors split along their last dim (in, in/2,
  in/group); 1-D per-output-channel scales (out,) are replicated (each rank's partial sum is
  already in the output's scale); pre_quant_scale (in,) is split with the input;
- 0-d and one-element tensors (per-tensor scales such as input_scale) are replicated.

INT4 groups never straddle ranks: a row-parallel input of `w` features splits into w/N per rank,
which must be a multiple of the group size (`check_tp_split` with the engine's QuantConfig says
so before any tensor is written). Per-token activation scales (w8a8_sq) of a row-parallel layer
take the maximum over the ranks (engine/quant/methods.py: W8A8Method), so every rank quantizes
its input slice with the whole token's scale, as TP=1 does.
"""

from __future__ import annotations

import math
import re

import torch

from engine.config import ModelConfig, QuantConfig
from engine.errors import BuildError

_VOCAB = re.compile(r"^(embed_tokens|lm_head)\.")
_QKV = re.compile(r"^layers\.\d+\.self_attn\.qkv_proj\.")
_GATE_UP = re.compile(r"^layers\.\d+\.mlp\.gate_up_proj\.")
_ROW = re.compile(r"^layers\.\d+\.(self_attn\.o_proj|mlp\.down_proj)\.")


def check_tp_split(model: ModelConfig, tp_size: int, quant: QuantConfig | None = None) -> None:
    """Raise BuildError when `model` cannot be split into `tp_size` ranks of whole heads (and,
    for an int4 `quant`, of whole quantization groups)."""
    nq, nkv, n = model.num_heads, model.num_kv_heads, tp_size
    if n < 1:
        raise BuildError(f"--tp must be a positive integer, got {n}")
    if n == 1:
        return
    if n > nq:
        raise BuildError(f"--tp {n} is larger than the model's {nq} attention heads (each rank needs whole heads)")
    if nq % n:
        raise BuildError(f"--tp {n} does not divide the model's {nq} attention heads; choose a divisor of {nq}")
    if nkv >= n and nkv % n:
        raise BuildError(f"--tp {n} does not divide the model's {nkv} KV heads; choose a divisor of {nkv}")
    if nkv < n and n % nkv:
        raise BuildError(
            f"--tp {n} is not a multiple of the model's {nkv} KV heads, so they cannot be replicated "
            f"evenly; choose a divisor of {nkv} or a multiple of it that divides {nq}"
        )
    if model.intermediate_size % n:
        raise BuildError(f"--tp {n} does not divide the MLP's intermediate size {model.intermediate_size}")
    if quant is not None and quant.algo == "int4_awq":
        _check_int4_groups(model, quant.group_size or 128, n)


def _check_int4_groups(model: ModelConfig, group: int, tp_size: int) -> None:
    """Each rank's input slice of a row-parallel layer must hold whole int4 groups."""
    row_parallel_inputs = {"o_proj": model.num_heads * model.head_dim, "down_proj": model.intermediate_size}
    for layer, width in row_parallel_inputs.items():
        if (width // tp_size) % group:
            groups = width // group
            fix = f"a --tp that divides {groups}" if groups > 1 else "--tp 1"
            raise BuildError(
                f"--tp {tp_size} gives each rank {width // tp_size} of {layer}'s {width} input features, not a "
                f"multiple of the int4 --group-size {group}; use {fix}, or a smaller --group-size"
            )


def local_kv_heads(model: ModelConfig, tp_size: int) -> int:
    """KV heads each rank holds (replicated ones included)."""
    return max(1, model.num_kv_heads // tp_size)


def vocab_shard_rows(model: ModelConfig, tp_size: int) -> int:
    return math.ceil(model.vocab_size / tp_size)


def shard_tensor(name: str, tensor: torch.Tensor, model: ModelConfig, tp_size: int, rank: int) -> torch.Tensor:
    """The slice of the unsharded Kiln tensor `name` that `rank` of `tp_size` holds (a new,
    contiguous tensor; `tensor` itself for tp_size 1). Call `check_tp_split` first."""
    if tp_size == 1:
        return tensor
    if not 0 <= rank < tp_size:
        raise ValueError(f"rank {rank} out of range for tp_size {tp_size}")
    if tensor.dim() == 0 or tensor.numel() == 1:
        return tensor.clone()
    if name.endswith("pre_quant_scale"):  # (in,): scales the layer's input features
        if not _ROW.match(name):
            return tensor.clone()  # column-parallel and vocab layers see the whole input
        if tensor.shape[-1] % tp_size:
            raise BuildError(f"{name}: {tensor.shape[-1]} input features are not divisible by --tp {tp_size}")
        return tensor.chunk(tp_size, dim=-1)[rank].contiguous()
    if _VOCAB.match(name):
        return _vocab_rows(tensor, model, tp_size, rank)
    if _QKV.match(name):
        return _qkv_rows(name, tensor, model, tp_size, rank)
    if _GATE_UP.match(name):
        return _gate_up_rows(name, tensor, model, tp_size, rank)
    if _ROW.match(name):
        if tensor.dim() < 2:  # per-output-channel scale (out,)
            return tensor.clone()
        cols = tensor.shape[-1]  # in, in/2 (packed int4) or in/group (int4 scales)
        if cols % tp_size:
            raise BuildError(
                f"{name}: its last dim {cols} cannot be split into --tp {tp_size} equal parts"
                + (" (int4 groups would straddle ranks; use a smaller --group-size)" if name.endswith("weight_scale") else "")
            )
        return tensor.chunk(tp_size, dim=-1)[rank].contiguous()
    return tensor.clone()  # norms (and anything else) are replicated


def _row_unit(name: str, tensor: torch.Tensor, full_rows: int) -> int:
    """Tensor rows per logical output row (1 for weights and biases; more for packed layouts)."""
    rows = tensor.shape[0]
    if rows % full_rows:
        raise BuildError(f"{name}: {rows} rows do not match the layer's {full_rows} output rows")
    return rows // full_rows


def _vocab_rows(tensor: torch.Tensor, model: ModelConfig, tp_size: int, rank: int) -> torch.Tensor:
    shard = vocab_shard_rows(model, tp_size)
    start = rank * shard
    stop = min(start + shard, tensor.shape[0])
    out = tensor.new_zeros((shard, *tensor.shape[1:]))  # padding rows stay zero
    if stop > start:
        out[: stop - start] = tensor[start:stop]
    return out


def _qkv_rows(name: str, tensor: torch.Tensor, model: ModelConfig, tp_size: int, rank: int) -> torch.Tensor:
    nq, nkv, hd = model.num_heads, model.num_kv_heads, model.head_dim
    unit = _row_unit(name, tensor, (nq + 2 * nkv) * hd) * hd  # tensor rows per head
    q, k, v = tensor.split([nq * unit, nkv * unit, nkv * unit], dim=0)
    q_local = nq // tp_size
    q_part = q[rank * q_local * unit:(rank + 1) * q_local * unit]
    if nkv >= tp_size:
        kv_local = nkv // tp_size
        first = rank * kv_local
    else:
        kv_local = 1
        first = rank * nkv // tp_size  # the KV head this rank's query heads attend to
    k_part = k[first * unit:(first + kv_local) * unit]
    v_part = v[first * unit:(first + kv_local) * unit]
    return torch.cat([q_part, k_part, v_part], dim=0).contiguous()


def _gate_up_rows(name: str, tensor: torch.Tensor, model: ModelConfig, tp_size: int, rank: int) -> torch.Tensor:
    unit = _row_unit(name, tensor, 2 * model.intermediate_size)
    gate, up = tensor.chunk(2, dim=0)
    local = model.intermediate_size // tp_size * unit
    sl = slice(rank * local, (rank + 1) * local)
    return torch.cat([gate[sl], up[sl]], dim=0).contiguous()
