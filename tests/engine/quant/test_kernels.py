"""Kiln's packed layouts and CPU kernels against float references (no ModelOpt involved)."""

from __future__ import annotations

import pytest
import torch

from engine.config import QuantConfig
from engine.model.layers import ColumnParallelLinear, RowParallelLinear
from engine.quant import kernels
from engine.quant.methods import get_linear_method, process_weights_after_loading


def test_int4_pack_round_trip_and_nibble_order() -> None:
    q = torch.randint(-8, 8, (6, 10), dtype=torch.int8)
    packed = kernels.pack_int4(q)
    assert packed.shape == (6, 5) and packed.dtype == torch.uint8
    assert torch.equal(kernels.unpack_int4(packed), q)
    # column 0 in the low nibble, column 1 in the high one, each stored as value + 8
    assert int(packed[0, 0]) == (int(q[0, 0]) + 8) | ((int(q[0, 1]) + 8) << 4)


def test_modelopt_int4_layout_is_row_pairs_twos_complement() -> None:
    packed = torch.tensor([[0x9F, 0x70]], dtype=torch.uint8)  # low nibbles F, 0; high nibbles 9, 7
    assert kernels.unpack_modelopt_int4(packed).tolist() == [[-1, 0], [-7, 7]]


def _reference_weights(out: int, cols: int, algo: str, group: int = 128) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out, cols, generator=g) * 0.05
    if algo == "fp8":
        scale = w.abs().amax(1) / kernels.FP8_MAX
        return {"weight": (w / scale[:, None]).to(torch.float8_e4m3fn), "weight_scale": scale}
    if algo in ("int8_wo", "w8a8_sq"):
        q, scale = kernels.quantize_rows_int8(w)
        extra = {"pre_quant_scale": torch.rand(cols, generator=g) + 0.5} if algo == "w8a8_sq" else {}
        return {"weight": q, "weight_scale": scale, **extra}
    groups = w.view(out, cols // group, group)
    scale = groups.abs().amax(-1) / 7
    q = torch.clamp(torch.round(groups / scale[..., None]), -8, 7).view(out, cols)
    return {"weight": kernels.pack_int4(q), "weight_scale": scale, "pre_quant_scale": torch.rand(cols, generator=g) + 0.5}


def _dequantized(params: dict[str, torch.Tensor], algo: str) -> torch.Tensor:
    if algo == "int4_awq":
        return kernels.dequantize_int4(params["weight"], params["weight_scale"])
    return params["weight"].float() * params["weight_scale"].float()[:, None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("algo", ["fp8", "int8_wo", "w8a8_sq", "int4_awq"])
@pytest.mark.parametrize("layer_cls", [ColumnParallelLinear, RowParallelLinear])
def test_quantized_linear_matches_float_reference(algo: str, dtype: torch.dtype, layer_cls: type) -> None:
    out, cols = 96, 256
    quant = QuantConfig(algo=algo, group_size=128 if algo == "int4_awq" else None)
    if layer_cls is ColumnParallelLinear:
        layer = ColumnParallelLinear(cols, out, False, dtype, quant)
    else:
        layer = RowParallelLinear(cols, out, dtype, quant)
    params = _reference_weights(out, cols, algo)
    state = dict(layer.named_parameters())
    assert set(state) == set(params)
    with torch.no_grad():
        for name, value in params.items():
            state[name].copy_(value)
    process_weights_after_loading(layer)
    x = torch.randn(5, cols, generator=torch.Generator().manual_seed(1)).to(dtype)
    x_ref = x.float() * params["pre_quant_scale"] if "pre_quant_scale" in params else x.float()
    expected = x_ref @ _dequantized(params, algo).t()
    got = layer(x).float()
    # float32: kernel rounding only; W8A8 adds per-token int8 activations; bfloat16 adds its rounding.
    # float32 activations of the int8 / int4 CPU kernels are rounded to bfloat16 (kernels.cpu_kernel_dtype).
    exact_fp32 = algo == "fp8"
    tol = {"w8a8_sq": 0.02}.get(algo, 1e-4 if dtype == torch.float32 and exact_fp32 else 0.02)
    err = (got - expected).abs().max() / expected.abs().max()
    assert err <= tol, f"{algo} {dtype}: relative error {err:.2e} > {tol}"


def test_unquantized_layers_have_no_method() -> None:
    assert get_linear_method(None) is None and get_linear_method(QuantConfig()) is None
    layer = ColumnParallelLinear(8, 4, False, torch.float32, QuantConfig())
    assert [n for n, _ in layer.named_parameters()] == ["weight"]


def test_int4_group_must_divide_input() -> None:
    with pytest.raises(ValueError, match="not a multiple of group_size 128"):
        ColumnParallelLinear(192, 64, False, torch.float32, QuantConfig(algo="int4_awq", group_size=128))
