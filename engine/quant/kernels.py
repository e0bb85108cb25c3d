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
    """x (..., in) @ int4 weight^T -> (..., out), with torch's CPU int4 kernel. float32
    activations run the kernel in bfloat16 (see `cpu_kernel_dtype`); scales_and_zeros must be in
    `cpu_kernel_dtype(x.dtype)`. Returns x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    y = torch._weight_int4pack_mm_for_cpu(x2.to(scales_and_zeros.dtype).contiguous(), weight, group_size,
                                          scales_and_zeros).to(x.dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def cpu_kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The activation dtype torch's CPU weight-only kernels run fast in: their float32 paths
    (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) are reference loops, 30-100x slower
    than the bfloat16 ones on this 2-core AVX2 machine at 32 tokens (benchmarks/quant_bench.py).
    So float32 engines round a quantized layer's activations to bfloat16 for the GEMM only; the
    kernel accumulates in float32 and the scales are applied in float32 after it."""
    return torch.bfloat16 if dtype == torch.float32 else dtype


# --------------------------------------------------------------------------- int8


def quantize_rows_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: w (out, in) -> (int8 (out, in), float32 scale (out,))."""
    amax = w.float().abs().amax(dim=1).clamp(min=1e-8)
    scale = amax / 127.0
    q = torch.clamp(torch.round(w.float() / scale.unsqueeze(1)), -128, 127).to(torch.int8)
    return q, scale


def int8_weight_only_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ (int8 weight * scale)^T -> (..., out) with `torch._weight_int8pack_mm`.
    weight: int8 (out, in) contiguous; scale (out,) float32 or x's dtype. Returns x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    kernel_dtype = cpu_kernel_dtype(x.dtype) if x.device.type == "cpu" else x.dtype
    if kernel_dtype == x.dtype and scale.dtype == x.dtype:
        y = torch._weight_int8pack_mm(x2.contiguous(), weight, scale)
    else:  # bf16 GEMM with unit scales, the real (float32) scales after it
        y = (_int8pack_mm_unscaled(x2.to(kernel_dtype), weight) * scale.float()).to(x.dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _int8pack_mm_unscaled(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (T, in) @ int8 weight (out, in)^T through `_weight_int8pack_mm` with unit scales, in
    x's dtype (accumulated in float32 by the kernel) -> float32 (T, out)."""
    ones = torch.ones(weight.shape[0], dtype=x.dtype, device=x.device)
    return torch._weight_int8pack_mm(x.contiguous(), weight, ones).float()


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


def w8a8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                pre_quant_scale: torch.Tensor,
                reduce_amax: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """SmoothQuant W8A8: (x * pre_quant_scale) quantized per token to int8, int8 x int8 products
    summed per output, rescaled by token and row scales. weight: int8 (out, in) (on CUDA stored
    so that `weight.t()` is contiguous); weight_scale: float32 (out,). Returns x's dtype.
    `reduce_amax`: see quantize_per_token_int8.

    CUDA: `torch._int_mm` (int32 accumulation). CPU: torch's `_int_mm` is a reference loop (about
    0.75 ms per token for a 576x1536 layer here), so the int8 activations are carried exactly in
    bfloat16 (|q| <= 127 needs 7 bits) through `_weight_int8pack_mm` with unit scales, which
    accumulates in float32 (exact below 2**24) and rounds each sum to bfloat16 (rel. 2**-9)."""
    x2 = (x.reshape(-1, x.shape[-1]) * pre_quant_scale).contiguous()
    xq, xs = quantize_per_token_int8(x2, reduce_amax)
    if x.device.type == "cpu":
        acc = _int8pack_mm_unscaled(xq.to(torch.bfloat16), weight)  # (T, out)
    else:  # pragma: no cover - UNTESTED (no GPU here)
        if xq.shape[0] <= 16:  # cuBLAS int8 needs M > 16
            xq = torch.nn.functional.pad(xq, (0, 0, 0, 17 - xq.shape[0]))
        acc = torch._int_mm(xq, weight.t())[: x2.shape[0]].float()  # (T, out) int32
    y = (acc * xs * weight_scale).to(x.dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1])


# --------------------------------------------------------------------------- fp8

FP8_MAX = 448.0


def fp8_to_float(weight: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn -> float32 through a 256-entry table (exact for every code, NaN included);
    about twice as fast on this CPU as torch's elementwise conversion."""
    table = _FP8_TABLE.get(weight.device)
    if table is None:
        codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
        table = _FP8_TABLE[weight.device] = codes.float().to(weight.device)
    return torch.take(table, weight.view(torch.uint8).long())


_FP8_TABLE: dict[torch.device, torch.Tensor] = {}


def fp8_linear_cpu(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x @ (fp8 weight * row scale)^T, dequantizing the weight on the fly to x's dtype (a CPU has
    no fp8 GEMM: this path saves memory, not time)."""
    w = (fp8_to_float(weight) * scale.float().unsqueeze(1)).to(x.dtype)
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
