"""Quantized paged KV cache: K/V stored as int8 or fp8 (e4m3) with one float16 scale per token and
KV head, dequantized when attention gathers them.

Storage per token and KV head: `head_dim` bytes + 2 bytes of scale, against `2 * head_dim` bytes
in bfloat16/float16 (so ~2x the blocks for the same memory; ~4x against float32). Scales are
dynamic (absmax of each token-head vector), so no calibration is needed and prefix-cached blocks
stay valid.

Layout: `kv_scales` (layers, 2, num_blocks, block_size, kv_heads) next to the cache
(layers, 2, num_blocks, block_size, kv_heads, head_dim); slot = block * block_size + offset in both.
"""

from __future__ import annotations

import torch

SCALE_DTYPE = torch.float16
STORAGE_DTYPES: dict[str, torch.dtype] = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
_QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


def kv_storage(kv_cache_dtype: str, model_dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype | None]:
    """(cache element dtype, scale dtype or None) for `build.quantization.kv_cache_dtype`."""
    if kv_cache_dtype == "auto":
        return model_dtype, None
    if kv_cache_dtype not in STORAGE_DTYPES:
        raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} is not one of ['auto', *{list(STORAGE_DTYPES)}]")
    return STORAGE_DTYPES[kv_cache_dtype], SCALE_DTYPE


def quantize_kv(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, kv_heads, hd) -> (values (T, kv_heads, hd) in `dtype`, scales (T, kv_heads) float16)."""
    qmax = _QMAX[dtype]
    x32 = x.float()
    # Scales are stored in float16; round them first so dequantization uses exactly the stored value.
    scale = (x32.abs().amax(dim=-1) / qmax).clamp(min=1e-6).to(SCALE_DTYPE)
    y = x32 / scale.float().unsqueeze(-1)
    if dtype == torch.int8:
        return torch.clamp(torch.round(y), -128, 127).to(torch.int8), scale
    return y.clamp(-qmax, qmax).to(dtype), scale


def dequantize_kv(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """values (..., hd) + scales (...) -> (..., hd) in `dtype`."""
    return (values.to(torch.float32) * scales.to(torch.float32).unsqueeze(-1)).to(dtype)
