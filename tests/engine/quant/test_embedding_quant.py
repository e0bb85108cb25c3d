"""Per-row int8 vocab tables (`--embedding-quant int8`): exact stored values, the embedding and
the (tied) LM head against a float reference, engine sizes, tensor parallelism and the errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.build.builder import BuildOptions, build_engine
from engine.build.quantize import embedding_quant
from engine.errors import BuildError
from engine.quant import kernels

from .conftest import Quantized

PROMPTS = ["A banker is a fellow who lends you his umbrella", "The best way to predict the future",
           "Never trust a computer"]


@pytest.fixture(scope="module")
def int8_engines(quantized: Callable[[str], Quantized], tmp_path_factory: pytest.TempPathFactory
                 ) -> tuple[Path, Path]:
    """(int8 weights + float embedding, int8 weights + int8 embedding), from one ModelOpt export."""
    q = quantized("int8_wo")
    root = tmp_path_factory.mktemp("emb")
    with_table = build_engine(q.export_dir, root / "int8-emb", BuildOptions(dtype="float32", embedding_quant="int8"),
                              progress=False)
    return q.engine_dir, with_table


def test_stored_table_is_per_row_int8_of_the_float_table(int8_engines: tuple[Path, Path]) -> None:
    plain_dir, quant_dir = int8_engines
    plain = load_file(str(plain_dir / "rank0.safetensors"))
    quant = load_file(str(quant_dir / "rank0.safetensors"))
    assert quant["embed_tokens.weight"].dtype == torch.int8
    expected_q, expected_scale = kernels.quantize_rows_int8(plain["embed_tokens.weight"])
    assert torch.equal(quant["embed_tokens.weight"], expected_q)
    assert torch.equal(quant["embed_tokens.weight_scale"], expected_scale)
    assert set(quant) == set(plain) | {"embed_tokens.weight_scale"}
    # Every other tensor is untouched.
    for name, tensor in plain.items():
        if not name.startswith("embed_tokens."):
            assert torch.equal(quant[name], tensor), name
    config = json.loads((quant_dir / "config.json").read_text())
    assert config["build"]["quantization"]["embedding"] == "int8"
    # The table was 4 bytes per value, now 1 (+ 4 bytes of scale per row).
    vocab, hidden = plain["embed_tokens.weight"].shape
    saved = (plain_dir / "rank0.safetensors").stat().st_size - (quant_dir / "rank0.safetensors").stat().st_size
    assert abs(saved - (vocab * hidden * 3 - vocab * 4)) < 4096  # header differences only


def test_embedding_and_tied_head_match_the_float_table(int8_engines: tuple[Path, Path]) -> None:
    from engine import LLM

    plain_dir, quant_dir = int8_engines
    plain, quant = LLM(plain_dir, max_batch_size=4, max_seq_len=128), LLM(quant_dir, max_batch_size=4, max_seq_len=128)
    try:
        table = load_file(str(plain_dir / "rank0.safetensors"))["embed_tokens.weight"]
        q, s = kernels.quantize_rows_int8(table)
        dequant = q.float() * s.unsqueeze(1)
        emb = quant.engine.runner.model.embed_tokens
        ids = torch.tensor([0, 5, 17, table.shape[0] - 1])
        torch.testing.assert_close(emb(ids), dequant[ids], rtol=0, atol=1e-6)
        hidden = torch.randn(3, table.shape[1])
        # float32 engines run the int8 kernel on bfloat16 activations (kernels.cpu_kernel_dtype).
        want = hidden @ dequant.t()
        torch.testing.assert_close(emb.linear(hidden), want, rtol=0, atol=1e-2 * want.abs().max().item())
        # End to end: the int8 table changes logits by little and greedy tokens by nothing here.
        ids = quant.tokenizer(PROMPTS[0]).input_ids
        got_logits, want_logits = quant.engine.score(ids), plain.engine.score(ids)
        assert (got_logits - want_logits).abs().max() < 0.02 * want_logits.abs().max()
        assert torch.equal(got_logits.argmax(-1), want_logits.argmax(-1))
        from engine import SamplingParams

        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        got = [o.token_ids for o in quant.generate(PROMPTS, params)]
        want = [o.token_ids for o in plain.generate(PROMPTS, params)]
        assert got == want
    finally:
        plain.engine.close()
        quant.engine.close()


def test_tensor_parallel_int8_table_equals_tp1(quantized: Callable[[str], Quantized], int8_engines: tuple[Path, Path],
                                               tmp_path: Path) -> None:
    """Vocab-parallel shards of an int8 table: each rank's rows and scales, same tokens as tp=1."""
    from engine import LLM, SamplingParams

    tp2 = build_engine(quantized("int8_wo").export_dir, tmp_path / "tp2",
                       BuildOptions(dtype="float32", embedding_quant="int8", tp_size=2), progress=False)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    results = []
    for path in (int8_engines[1], tp2):
        llm = LLM(path, max_batch_size=4, max_seq_len=128)
        try:
            results.append([o.token_ids for o in llm.generate(PROMPTS, params)])
        finally:
            llm.engine.close()
    assert results[0] == results[1]


def test_auto_resolution_and_errors(quant_checkpoint: Path, tmp_path: Path) -> None:
    assert embedding_quant(BuildOptions(quantization="int8_wo")) == "int8"
    assert embedding_quant(BuildOptions(quantization="int4_awq")) == "int8"
    assert embedding_quant(BuildOptions(quantization="w8a8_sq")) == "int8"
    assert embedding_quant(BuildOptions(quantization="fp8")) == "none"
    assert embedding_quant(BuildOptions(quantization="int8_wo", embedding_quant="none")) == "none"
    with pytest.raises(BuildError, match="--embedding-quant 'int3'"):
        BuildOptions(embedding_quant="int3")
    with pytest.raises(BuildError, match="--embedding-quant int8 needs quantized weights"):
        build_engine(quant_checkpoint, tmp_path / "e", BuildOptions(embedding_quant="int8"), progress=False)
    with pytest.raises(BuildError, match="--smoothquant-alpha applies only to --w8a8"):
        BuildOptions(quantization="int8_wo", smoothquant_alpha=0.5)
    with pytest.raises(BuildError, match=r"--smoothquant-alpha must be in \[0, 1\]"):
        BuildOptions(quantization="w8a8_sq", smoothquant_alpha=1.5)
