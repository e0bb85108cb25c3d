"""Quantize / dequantize reference functions and the CPU kernels of each algorithm.

Kiln's on-disk layouts (the engine's rank files; `out` = output rows, `in` = input columns):

| algo     | `weight`                           | `weight_scale`          | `pre_quant_scale` |
|----------|------------------------------------|-------------------------|-------------------|
| fp8      | float8_e4m3fn (out, in)            | (out,) per row          | -                 |
| int8_wo  | int8 (out, in)                     | (out,) per row          | -                 |
| w8a8_sq  | int8 (out, in)                     | (out,) per row          | (in,)             |
| int4_awq | uint8 (out, in/2): column 2j in the | (out, in/group)        | (in,)             |
|          | low nibble, 2j+1 in the high one,   |                         |                   |
|          | each nibble = signed int4 + 8       |                         |                   |

Every per-row tensor splits with its rows (column parallel) and every per-input tensor with its
columns (row parallel); int4 `weight_scale` splits along dim 1 when the rank's columns are a
multiple of the group size. Dequantized weight = q * scale (per row, or per row and group).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

INT4_ZERO = 8  # stored nibble = signed int4 value + 8


# --------------------------------------------------------------------------- int4 packing


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Signed int4 values (out, in) in [-8, 7] (any integer dtype) -> Kiln uint8 (out, in/2)."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of input columns, got {q.shape[-1]}")
    u = (q.to(torch.int16) + INT4_ZERO).to(torch.uint8)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Kiln uint8 (out, in/2) -> signed int8 values (out, in)."""
    low = (packed & 0x0F).to(torch.int8) - INT4_ZERO
    high = (packed >> 4).to(torch.int8) - INT4_ZERO
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)


def unpack_modelopt_int4(packed: torch.Tensor) -> torch.Tensor:
    """ModelOpt's INT4 export layout, uint8 (out/2, in) with output row 2i in the low nibble and
    2i+1 in the high one, each nibble a two's-complement int4 -> signed int8 values (out, in)."""
    low = (packed & 0x0F).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    low = torch.where(low > 7, low - 16, low)
    high = torch.where(high > 7, high - 16, high)
    return torch.stack((low, high), dim=1).reshape(packed.shape[0] * 2, packed.shape[1])


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Kiln int4 (out, in/2) + scale (out, in/group) -> float32 weight (out, in)."""
    q = unpack_int4(packed).float()
    out, cols = q.shape
    groups = scale.shape[1]
    return (q.view(out, groups, cols // groups) * scale.float().unsqueeze(-1)).view(out, cols)


def int4_cpu_pack(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Kiln int4 layout -> (weight, scales_and_zeros) for `torch._weight_int4pack_mm_for_cpu`:
    weight uint8 (out, in/2) in torch's tiled order, scales_and_zeros (in/group, out, 2) in `dtype`
    (torch dequantizes (nibble - 8) * scale + zero; zero is 0 for ModelOpt's symmetric int4)."""
    nibbles = unpack_int4(packed).to(torch.int32) + INT4_ZERO  # (out, in) in [0, 15]
    weight = torch._convert_weight_to_int4pack_for_cpu(nibbles.contiguous(), 1)
    s = scale.t().to(dtype)  # (groups, out)
    return weight, torch.stack((s, torch.zeros_like(s)), dim=-1).contiguous()


def int4_linear_cpu(x: torch.Tensor, weight: torch.Tensor, group_size: int,
                    scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ int4 weight^T -> (..., out), with torch's CPU int4 kernel."""
    x2 = x.reshape(-1, x.shape[-1])
    y = torch._weight_int4pack_mm_for_cpu(x2.contiguous(), weight, group_size, scales_and_zeros)
    return y.reshape(*x.shape[:-1], y.shape[-1])


# --------------------------------------------------------------------------- int8


def quantize_rows_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: w (out, in) -> (int8 (out, in), float32 scale (out,))."""
    amax = w.float().abs().amax(dim=1).clamp(min=1e-8)
    scale = amax / 127.0
    q = torch.clamp(torch.round(w.float() / scale.unsqueeze(1)), -128, 127).to(torch.int8)
    return q, scale


def int8_weight_only_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ (int8 weight * scale)^T -> (..., out) with `torch._weight_int8pack_mm`.
    `scale` (out,) must have x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    y = torch._weight_int8pack_mm(x2.contiguous(), weight, scale)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def quantize_per_token_int8(x: torch.Tensor, reduce_amax: Callable[[torch.Tensor], torch.Tensor] | None = None,
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-token int8: x (T, in) -> (int8 (T, in), float32 scale (T, 1)).
    `reduce_amax` maps the per-token amax (T, 1) to the whole token's when x is one rank's slice."""
    x32 = x.float()
    amax = x32.abs().amax(dim=-1, keepdim=True)  # (T, 1)
    if reduce_amax is not None:
        amax = reduce_amax(amax)
    scale = amax.clamp(min=1e-8) / 127.0
    return torch.clamp(torch.round(x32 / scale), -128, 127).to(torch.int8), scale


def w8a8_linear(x: torch.Tensor, weight_t: torch.Tensor, weight_scale: torch.Tensor,
                pre_quant_scale: torch.Tensor,
                reduce_amax: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """SmoothQuant W8A8: (x * pre_quant_scale) quantized per token to int8, int8 x int8 -> int32
    matmul (`torch._int_mm`), rescaled by token and row scales. weight_t: int8 (in, out);
    weight_scale: float32 (out,). Returns x's dtype. `reduce_amax`: see quantize_per_token_int8."""
    x2 = (x.reshape(-1, x.shape[-1]) * pre_quant_scale).contiguous()
    xq, xs = quantize_per_token_int8(x2, reduce_amax)
    if xq.shape[0] <= 16 and xq.device.type == "cuda":  # cuBLAS int8 needs M > 16
        xq = torch.nn.functional.pad(xq, (0, 0, 0, 17 - xq.shape[0]))
    acc = torch._int_mm(xq, weight_t)[: x2.shape[0]]  # (T, out) int32
    y = (acc.float() * xs * weight_scale).to(x.dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1])


# --------------------------------------------------------------------------- fp8

FP8_MAX = 448.0


def fp8_linear_cpu(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x @ (fp8 weight * row scale)^T, dequantizing the weight on the fly to x's dtype."""
    w = weight.to(x.dtype) * scale.to(x.dtype).unsqueeze(1)
    return torch.nn.functional.linear(x, w)


def fp8_linear_cuda(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # pragma: no cover
    """UNTESTED (no GPU here): FP8 GEMM with a dynamic per-tensor activation scale via
    `torch._scaled_mm` (needs SM 8.9+); row scales applied after the GEMM."""
    x2 = x.reshape(-1, x.shape[-1])
    x_scale = (x2.abs().amax().float() / FP8_MAX).clamp(min=1e-12)
    xq = (x2 / x_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    one = torch.ones((), device=x.device, dtype=torch.float32)
    y = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=one, out_dtype=torch.float32)
    y = (y * scale.float()).to(x.dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1])
