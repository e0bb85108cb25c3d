"""ModelOpt unified checkpoints -> Kiln engines: exact weights, logits against ModelOpt's own
fake-quantized model, file sizes, and clear errors for checkpoints Kiln cannot read."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.build.builder import BuildOptions, build_engine
from engine.errors import CheckpointError
from engine.quant import kernels
from engine.quant.modelopt_format import read_modelopt_quant_config

from .conftest import QUANT_ALGOS, Quantized

PROJECTIONS = {  # Kiln fused name -> HF modules, in fusion order
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}
PROMPT = "A banker is a fellow who lends you his umbrella when the sun is shining"


def kiln_dequantized(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    w, s = tensors[name + ".weight"], tensors[name + ".weight_scale"]
    if w.dtype == torch.uint8:
        return kernels.dequantize_int4(w, s)
    return w.float() * s.float().unsqueeze(1)


def modelopt_dequantized(tensors: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """A ModelOpt-exported linear's weight in float32, by the format's definition (weight x scale)."""
    w, s = tensors[prefix + ".weight"], tensors[prefix + ".weight_scale"].float()
    if w.dtype == torch.uint8:  # int4: (out/2, in) packed along output rows, scale (out, in/group)
        q = kernels.unpack_modelopt_int4(w).float()
        out, cols = q.shape
        return (q.view(out, s.shape[1], -1) * s.unsqueeze(-1)).view(out, cols)
    return w.float() * (s if s.numel() == 1 else s.unsqueeze(1))


@pytest.mark.parametrize("algo", QUANT_ALGOS)
def test_unpacked_weights_equal_modelopt_dequantized(quantized: Callable[[str], Quantized], algo: str) -> None:
    q = quantized(algo)
    kiln = load_file(str(q.engine_dir / "rank0.safetensors"))
    exported = load_file(str(q.export_dir / "model.safetensors"))
    for i, layer in enumerate(q.reference.model.layers):
        for name, hf_parts in PROJECTIONS.items():
            got = kiln_dequantized(kiln, f"layers.{i}.{name}")
            expected = torch.cat([modelopt_dequantized(exported, f"model.layers.{i}.{p}") for p in hf_parts])
            assert torch.equal(got, expected), f"layers.{i}.{name} ({algo})"
            # ModelOpt's in-memory fake quantizer agrees with its own export up to rare ties that round
            # to the neighbouring level.
            with torch.no_grad():
                parts = [layer.get_submodule(p) for p in hf_parts]
                fake = torch.cat([m.weight_quantizer(m.weight).float() for m in parts])
            close = torch.isclose(got, fake, rtol=1e-6, atol=1e-7)
            assert close.float().mean() >= 0.999, f"layers.{i}.{name} ({algo}): {(~close).sum()} differ"


@pytest.mark.parametrize("algo", QUANT_ALGOS)
def test_engine_logits_match_modelopt_fake_quant(quantized: Callable[[str], Quantized], algo: str) -> None:
    """Kiln quantizes activations dynamically (or not at all on CPU): compare against ModelOpt's
    model with its static input quantizers off; W8A8's per-token int8 activations get a looser bound."""
    import modelopt.torch.quantization as mtq

    from engine import LLM

    q = quantized(algo)
    llm = LLM(q.engine_dir)
    ids = llm.tokenizer(PROMPT).input_ids
    reference = q.reference
    mtq.disable_quantizer(reference, "*input_quantizer")
    try:
        with torch.no_grad():
            expected = reference(torch.tensor([ids])).logits[0].float()
    finally:
        mtq.enable_quantizer(reference, "*input_quantizer")
    got = llm.engine.score(ids)
    if algo == "w8a8_sq":
        assert (got - expected).abs().max() <= 0.1 * expected.abs().max()
        assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.8
    elif algo in ("int8_wo", "int4_awq"):  # CPU kernels take bfloat16 activations (kernels.cpu_kernel_dtype)
        assert (got - expected).abs().max() <= 0.02 * expected.abs().max()
        assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.95
    else:
        # Same weights up to ModelOpt's own rare export/fake-quant rounding ties (see above).
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=5e-3)
        assert torch.equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("algo", QUANT_ALGOS)
def test_engine_file_is_expected_fraction(quantized: Callable[[str], Quantized], tiny_unquantized: Path,
                                          algo: str) -> None:
    """Projection weights take 1 byte (fp8, int8) or half a byte (int4) per parameter instead of 4."""
    q = quantized(algo)
    quant = load_file(str(q.engine_dir / "rank0.safetensors"))
    plain = load_file(str(tiny_unquantized / "rank0.safetensors"))
    proj_params = sum(t.numel() for n, t in plain.items() if n.rsplit(".", 2)[-2] in
                      ("qkv_proj", "o_proj", "gate_up_proj", "down_proj") and n.endswith(".weight"))
    other_bytes = sum(t.numel() * 4 for n, t in plain.items() if n.rsplit(".", 2)[-2] not in
                      ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))
    bits = 4 if algo == "int4_awq" else 8
    scale_bytes = sum(t.numel() * t.element_size() for n, t in quant.items() if n.endswith("_scale"))
    expected = other_bytes + proj_params * bits // 8 + scale_bytes
    size = (q.engine_dir / "rank0.safetensors").stat().st_size
    plain_size = (tiny_unquantized / "rank0.safetensors").stat().st_size
    assert expected <= size <= expected + 64 * 1024  # + the safetensors header
    assert size < plain_size
    report = json.loads((q.engine_dir / "build_report.json").read_text())
    assert report["quantization"] == algo


@pytest.fixture(scope="module")
def tiny_unquantized(quant_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_engine(quant_checkpoint, tmp_path_factory.mktemp("plain") / "engine",
                        BuildOptions(dtype="float32"), progress=False)


def test_quant_config_names_algo_and_group(quantized: Callable[[str], Quantized]) -> None:
    cfg = read_modelopt_quant_config(quantized("int4_awq").export_dir)
    assert (cfg.algo, cfg.group_size) == ("int4_awq", 128)
    assert read_modelopt_quant_config(quantized("w8a8_sq").export_dir).algo == "w8a8_sq"


def test_unsupported_or_broken_modelopt_checkpoints_are_clear_errors(
    quantized: Callable[[str], Quantized], tmp_path: Path
) -> None:
    bad = Path(shutil.copytree(quantized("int8_wo").export_dir, tmp_path / "bad"))
    qcfg = json.loads((bad / "hf_quant_config.json").read_text())
    qcfg["quantization"]["quant_algo"] = "NVFP4"
    (bad / "hf_quant_config.json").write_text(json.dumps(qcfg))
    with pytest.raises(CheckpointError, match="quant_algo 'NVFP4' is not supported"):
        build_engine(bad, tmp_path / "e1", BuildOptions(), progress=False)

    (bad / "hf_quant_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="hf_quant_config.json: not a ModelOpt quantization config"):
        build_engine(bad, tmp_path / "e2", BuildOptions(), progress=False)

    missing = Path(shutil.copytree(quantized("int8_wo").export_dir, tmp_path / "missing"))
    tensors = load_file(str(missing / "model.safetensors"))
    del tensors["model.layers.0.mlp.down_proj.weight_scale"]
    from safetensors.torch import save_file

    save_file(tensors, str(missing / "model.safetensors"))
    with pytest.raises(CheckpointError, match="down_proj.weight_scale' is missing"):
        build_engine(missing, tmp_path / "e3", BuildOptions(), progress=False)
