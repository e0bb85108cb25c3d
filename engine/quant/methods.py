"""Quantized linear methods: what a `ColumnParallelLinear` / `RowParallelLinear` allocates and how
it multiplies when the engine is quantized (`config.build.quantization.algo`).

A method is stateless; the layer holds the parameters, named like Kiln's engine tensors
(`...qkv_proj.weight`, `...qkv_proj.weight_scale`, `...qkv_proj.pre_quant_scale`), so loading a
rank file stays one loop over `named_parameters()`. Layouts and sharding rules: `kernels.py`.
`process_weights_after_loading` turns the portable on-disk layout into the kernel's layout
(e.g. torch's tiled int4 pack) once the weights are on their device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.config import QuantConfig
from engine.parallel import all_reduce_max
from engine.quant import kernels

DEFAULT_GROUP_SIZE = 128


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class LinearMethod:
    """Base: allocates `weight` (out, in) of `dtype` and runs `F.linear` (never used for the
    unquantized path, which the layers run directly)."""

    name = "none"

    def create_weights(self, layer: Any, out_features: int, in_features: int, dtype: torch.dtype) -> None:
        raise NotImplementedError

    def process_weights_after_loading(self, layer: Any) -> None:
        """Convert loaded parameters to the kernel's layout (default: nothing to do)."""

    def apply(self, layer: Any, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Fp8LinearMethod(LinearMethod):
    """e4m3 weights with per-row scales; CPU dequantizes on the fly, CUDA uses `_scaled_mm`."""

    name = "fp8"

    def create_weights(self, layer: Any, out_features: int, in_features: int, dtype: torch.dtype) -> None:
        layer.weight = _param(out_features, in_features, dtype=torch.float8_e4m3fn)
        layer.weight_scale = _param(out_features, dtype=torch.float32)

    def apply(self, layer: Any, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 9):  # pragma: no cover
            return kernels.fp8_linear_cuda(x, layer.weight, layer.weight_scale)
        return kernels.fp8_linear_cpu(x, layer.weight, layer.weight_scale)


class Int8WeightOnlyMethod(LinearMethod):
    """int8 per-row weights, activations in the build dtype: `torch._weight_int8pack_mm`."""

    name = "int8_wo"

    def create_weights(self, layer: Any, out_features: int, in_features: int, dtype: torch.dtype) -> None:
        layer.weight = _param(out_features, in_features, dtype=torch.int8)
        layer.weight_scale = _param(out_features, dtype=torch.float32)
        layer.compute_dtype = dtype

    def process_weights_after_loading(self, layer: Any) -> None:
        # The kernel wants the scales in the activations' dtype.
        layer.register_buffer("scale_c", layer.weight_scale.detach().to(layer.compute_dtype), persistent=False)

    def apply(self, layer: Any, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # pragma: no cover - UNTESTED (no GPU here): dequantize then GEMM
            return torch.nn.functional.linear(x, layer.weight.to(x.dtype) * layer.scale_c.unsqueeze(1))
        return kernels.int8_weight_only_linear(x, layer.weight, layer.scale_c)


class W8A8Method(LinearMethod):
    """SmoothQuant: x * pre_quant_scale, per-token dynamic int8 activations, int8 GEMM."""

    name = "w8a8_sq"

    def create_weights(self, layer: Any, out_features: int, in_features: int, dtype: torch.dtype) -> None:
        layer.weight = _param(out_features, in_features, dtype=torch.int8)
        layer.weight_scale = _param(out_features, dtype=torch.float32)
        layer.pre_quant_scale = _param(in_features, dtype=dtype)

    def process_weights_after_loading(self, layer: Any) -> None:
        if layer.weight.device.type != "cpu":  # pragma: no cover - `_int_mm` wants (in, out) contiguous
            layer.weight.data = layer.weight.data.t().contiguous().t()

    def apply(self, layer: Any, x: torch.Tensor) -> torch.Tensor:
        # A row-parallel rank holds a slice of each token: quantizing it with the whole token's scale
        # makes a TP engine compute what TP=1 (the build the accuracy gate measured) computes.
        reduce = all_reduce_max if getattr(layer, "input_is_sharded", False) else None
        return kernels.w8a8_linear(x, layer.weight, layer.weight_scale, layer.pre_quant_scale, reduce)


class Int4AwqMethod(LinearMethod):
    """int4 weights in groups of `group_size` input columns with AWQ's activation-aware scales.
    `pre_quant_scale` multiplies the input (ones where ModelOpt folded it into the norm)."""

    name = "int4_awq"

    def __init__(self, group_size: int) -> None:
        self.group_size = group_size

    def create_weights(self, layer: Any, out_features: int, in_features: int, dtype: torch.dtype) -> None:
        if in_features % self.group_size:
            raise ValueError(
                f"int4_awq: input features {in_features} are not a multiple of group_size {self.group_size}"
            )
        layer.weight = _param(out_features, in_features // 2, dtype=torch.uint8)
        layer.weight_scale = _param(out_features, in_features // self.group_size, dtype=torch.float32)
        layer.pre_quant_scale = _param(in_features, dtype=dtype)
        layer.compute_dtype = dtype
        layer.int4_cpu_packed = False
        layer.skip_pre_quant_scale = False

    def process_weights_after_loading(self, layer: Any) -> None:
        if layer.weight.device.type != "cpu":  # pragma: no cover - UNTESTED on GPU: dequantize path
            return
        packed, scales_zeros = kernels.int4_cpu_pack(layer.weight.data, layer.weight_scale.data,
                                                     kernels.cpu_kernel_dtype(layer.compute_dtype))
        layer.weight.data = packed  # same shape and dtype, torch's tiled order
        layer.register_buffer("scales_and_zeros", scales_zeros, persistent=False)
        layer.int4_cpu_packed = True
        # The float32 scales now live in `scales_and_zeros`; do not keep them resident twice.
        layer.weight_scale.data = torch.empty(0, dtype=torch.float32)
        layer.skip_pre_quant_scale = bool(torch.all(layer.pre_quant_scale == 1))

    def apply(self, layer: Any, x: torch.Tensor) -> torch.Tensor:
        if not layer.skip_pre_quant_scale:
            x = x * layer.pre_quant_scale
        if layer.int4_cpu_packed:
            return kernels.int4_linear_cpu(x, layer.weight, self.group_size, layer.scales_and_zeros)
        w = kernels.dequantize_int4(layer.weight, layer.weight_scale)  # pragma: no cover - GPU fallback
        return torch.nn.functional.linear(x, w.to(x.dtype))  # pragma: no cover


def get_linear_method(quant: QuantConfig | None) -> LinearMethod | None:
    """The method for `quant.algo`, or None for unquantized layers."""
    if quant is None or quant.algo == "none":
        return None
    if quant.algo == "fp8":
        return Fp8LinearMethod()
    if quant.algo == "int8_wo":
        return Int8WeightOnlyMethod()
    if quant.algo == "w8a8_sq":
        return W8A8Method()
    if quant.algo == "int4_awq":
        return Int4AwqMethod(quant.group_size or DEFAULT_GROUP_SIZE)
    raise ValueError(f"unknown quantization algo {quant.algo!r}")


def process_weights_after_loading(model: nn.Module) -> None:
    """Give every quantized linear layer of `model` its kernel layout (call once, after loading
    and moving the model to its device)."""
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)


class Int8EmbeddingMethod(Int8WeightOnlyMethod):
    """A per-row int8 vocab table (`weight` int8 (V, H), `weight_scale` float32 (V,)): the int8
    weight-only layout and LM-head GEMM (tied or not), plus `embed`, which gathers rows and
    dequantizes them. Kiln quantizes the table itself, round-to-nearest per row."""

    name = "int8_embedding"

    def embed(self, layer: Any, ids: torch.Tensor) -> torch.Tensor:
        """ids (T,) -> dequantized rows (T, H) in the compute dtype."""
        rows = layer.weight.index_select(0, ids).float()
        return (rows * layer.weight_scale.index_select(0, ids).unsqueeze(-1)).to(layer.compute_dtype)


def get_embedding_method(quant: QuantConfig | None) -> Int8EmbeddingMethod | None:
    """The vocab-table method for `quant.embedding`, or None for a table in the model dtype."""
    if quant is None or quant.embedding == "none":
        return None
    if quant.embedding == "int8":
        return Int8EmbeddingMethod()
    raise ValueError(f"unknown embedding quantization {quant.embedding!r}")
