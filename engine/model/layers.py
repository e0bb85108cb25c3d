"""Building blocks of a Llama-family decoder, tensor-parallel aware.

Each parallel layer allocates only its rank's slice; the engine's rank file already holds
that slice under the layer's parameter name, so loading is one loop over `state_dict()`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import QuantConfig
from engine.parallel import all_reduce, get_tp_rank, get_tp_size
from engine.quant.methods import get_embedding_method, get_linear_method


def _empty(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _empty(dim, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed in float32, like Hugging Face, so results match for half-precision weights.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def forward_residual(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add `x` into the residual stream and normalise: returns (normed, new_residual)."""
        residual = residual + x
        return self.forward(residual), residual


class ColumnParallelLinear(nn.Module):
    """y = x W^T (+ b) with W's output rows split across ranks; output stays sharded."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 quant: QuantConfig | None = None) -> None:
        super().__init__()
        tp = get_tp_size()
        if out_features % tp:
            raise ValueError(f"output features {out_features} not divisible by tp_size {tp}")
        self._init_weights(out_features // tp, in_features, dtype, quant)
        self.bias = _empty(out_features // tp, dtype=dtype) if bias else None

    def _init_weights(self, out_features: int, in_features: int, dtype: torch.dtype,
                      quant: QuantConfig | None) -> None:
        """`weight` (out, in) in `dtype`, or the quantized parameters of `quant` (engine/quant)."""
        self.quant_method = get_linear_method(quant)
        if self.quant_method is None:
            self.weight = _empty(out_features, in_features, dtype=dtype)
        else:
            self.quant_method.create_weights(self, out_features, in_features, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_method is None:
            return F.linear(x, self.weight, self.bias)
        y = self.quant_method.apply(self, x)
        return y if self.bias is None else y + self.bias


class RowParallelLinear(nn.Module):
    """y = x W^T with W's input columns split across ranks; partial sums are all-reduced."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype,
                 quant: QuantConfig | None = None) -> None:
        super().__init__()
        tp = get_tp_size()
        if in_features % tp:
            raise ValueError(f"input features {in_features} not divisible by tp_size {tp}")
        self.input_is_sharded = tp > 1  # quantized methods with dynamic activation scales read it
        self.quant_method = get_linear_method(quant)
        if self.quant_method is None:
            self.weight = _empty(out_features, in_features // tp, dtype=dtype)
        else:
            self.quant_method.create_weights(self, out_features, in_features // tp, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_method is None:
            return all_reduce(F.linear(x, self.weight))
        return all_reduce(self.quant_method.apply(self, x))


def local_head_counts(num_heads: int, num_kv_heads: int) -> tuple[int, int]:
    """Query and KV heads owned by this rank. KV heads are replicated when fewer than ranks."""
    tp = get_tp_size()
    if num_heads % tp:
        raise ValueError(f"num_heads {num_heads} not divisible by tp_size {tp}")
    if num_kv_heads >= tp:
        if num_kv_heads % tp:
            raise ValueError(f"num_kv_heads {num_kv_heads} not divisible by tp_size {tp}")
        return num_heads // tp, num_kv_heads // tp
    if tp % num_kv_heads:
        raise ValueError(f"tp_size {tp} not a multiple of num_kv_heads {num_kv_heads}")
    return num_heads // tp, 1


LM_HEAD_SLICE = 1024  # vocab rows per CPU GEMM of the LM head (see _VocabParallelTable.linear)


class _VocabParallelTable(nn.Module):
    """This rank's rows [r*s, (r+1)*s) of a vocab table, s = ceil(V / tp): in the model dtype, or
    per-row int8 when the engine quantizes its embedding (`quant.embedding`, engine/quant/methods.py)."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype,
                 quant: QuantConfig | None = None) -> None:
        super().__init__()
        tp = get_tp_size()
        self.vocab_size = vocab_size
        self.shard_size = math.ceil(vocab_size / tp)
        self.vocab_start = get_tp_rank() * self.shard_size
        self.quant_method = get_embedding_method(quant)
        if self.quant_method is None:
            self.weight = _empty(self.shard_size, hidden_size, dtype=dtype)
        else:
            self.quant_method.create_weights(self, self.shard_size, hidden_size, dtype)

    def rows(self, local_ids: torch.Tensor) -> torch.Tensor:
        """local_ids (T,) in [0, shard_size) -> their rows (T, H) in the compute dtype."""
        if self.quant_method is None:
            return F.embedding(local_ids, self.weight)
        return self.quant_method.embed(self, local_ids)

    def linear(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (S, H) -> this rank's logits (S, shard_size): hidden @ table^T.

        On CPU, several rows go through the table in slices of LM_HEAD_SLICE vocab rows: one
        (S, H) x (H, V) GEMM over a 49152-row table runs at a third of the rate of the slices
        here (SmolLM2, 16 rows: 43 -> 26 ms per step); each logit is the same dot product."""
        if self.quant_method is not None:
            return self.quant_method.apply(self, hidden)
        if hidden.device.type != "cpu" or hidden.shape[0] < 8 or self.shard_size <= LM_HEAD_SLICE:
            return F.linear(hidden, self.weight)
        out = hidden.new_empty(hidden.shape[0], self.shard_size)
        for start in range(0, self.shard_size, LM_HEAD_SLICE):
            rows = self.weight[start:start + LM_HEAD_SLICE]
            torch.matmul(hidden, rows.t(), out=out[:, start:start + rows.shape[0]])
        return out


class VocabParallelEmbedding(_VocabParallelTable):
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if get_tp_size() == 1:
            return self.rows(input_ids)
        local = input_ids - self.vocab_start
        in_shard = (local >= 0) & (local < self.shard_size)
        out = self.rows(local.clamp(0, self.shard_size - 1))
        out = out * in_shard.unsqueeze(-1).to(out.dtype)
        return all_reduce(out)


class ParallelLMHead(_VocabParallelTable):
    """This rank's vocab slice of the output projection (the model all-gathers the logits)."""


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (rotate-half form, as Hugging Face Llama), with Llama-3,
    linear and dynamic-NTK-free scaling. cos/sin are precomputed for `max_positions`."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        inv_freq = _scale_inv_freq(inv_freq, scaling)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (P, hd/2)
        self.cos: torch.Tensor
        self.sin: torch.Tensor
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x: (T, heads, hd), positions: (T,) -> x rotated, same dtype."""
        cos = self.cos[positions].unsqueeze(1)  # (T, 1, hd/2)
        sin = self.sin[positions].unsqueeze(1)
        x32 = x.float()
        x1, x2 = x32.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return out.to(x.dtype)


def _scale_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any] | None) -> torch.Tensor:
    if not scaling:
        return inv_freq
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen = old_ctx / low
        high_wavelen = old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_scaling type {rope_type!r} (supported: default, linear, llama3)")
