"""GGUF -> HF checkpoint: exact round trip of a llama.cpp-style tiny GGUF, and the real SmolLM2."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engine.build.builder import build_engine
from engine.build.default_model import default_checkpoint_path
from engine.build.gguf import GGUFFile, convert_gguf, unpermute_rope_rows
from engine.config import load_engine_config
from engine.errors import CheckpointError

TEXTS = ["hello world the quick brown fox", "日本語のテキスト 🚀 café", "  leading\tspaces\n", "<|im_start|>user\nhi<|im_end|>"]


@pytest.mark.parametrize("kind", ["llama-gqa", "llama-untied"])
def test_f32_gguf_round_trip_is_exact(
    kind: str, tiny_checkpoint: Callable[..., Path], write_gguf: Callable[..., Path], tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    ckpt = tiny_checkpoint(kind)
    back = convert_gguf(write_gguf(ckpt, tmp_path / "m.gguf"), tmp_path / "hf", progress=False)
    original, converted = load_file(str(ckpt / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert original.keys() == converted.keys()
    assert all(torch.equal(original[n], converted[n]) for n in original)  # q/k un-permuted exactly
    hf_cfg, cfg = json.loads((ckpt / "config.json").read_text()), json.loads((back / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id"):
        assert cfg[key] == hf_cfg[key], key
    tok_a, tok_b = AutoTokenizer.from_pretrained(ckpt), AutoTokenizer.from_pretrained(back)
    assert [tok_a.encode(t) for t in TEXTS] == [tok_b.encode(t) for t in TEXTS]
    assert tok_b.chat_template == tok_a.chat_template


def test_quantized_gguf_dequantizes_like_gguf_py(
    tiny_checkpoint: Callable[..., Path], write_gguf: Callable[..., Path], tmp_path: Path
) -> None:
    import gguf

    ckpt = tiny_checkpoint("llama-gqa")
    back = convert_gguf(write_gguf(ckpt, tmp_path / "q8.gguf", quant="Q8_0"), tmp_path / "hf", progress=False)
    original, converted = load_file(str(ckpt / "model.safetensors")), load_file(str(back / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    q8 = gguf.GGMLQuantizationType.Q8_0
    expected = gguf.quants.dequantize(gguf.quants.quantize(original[name].numpy(), q8), q8)
    assert np.array_equal(converted[name].numpy(), expected)
    assert not torch.equal(converted[name], original[name])  # really was quantized


def test_unpermute_inverts_llama_cpp_permute() -> None:
    weight = np.arange(6 * 16 * 4, dtype=np.float32).reshape(6 * 16, 4)  # 6 heads of head_dim 16
    permuted = weight.reshape(6, 2, 8, 4).swapaxes(1, 2).reshape(weight.shape)  # llama.cpp's permute
    assert np.array_equal(unpermute_rope_rows(permuted, 6), weight)


def test_build_engine_from_gguf(
    tiny_checkpoint: Callable[..., Path], write_gguf: Callable[..., Path], tmp_path: Path
) -> None:
    ckpt = tiny_checkpoint("llama-gqa")
    gguf_path = write_gguf(ckpt, tmp_path / "tiny.gguf")
    from_gguf = build_engine(gguf_path, tmp_path / "g", progress=False)
    from_hf = build_engine(ckpt, tmp_path / "h", progress=False)
    a, b = load_file(str(from_gguf / "rank0.safetensors")), load_file(str(from_hf / "rank0.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    config = load_engine_config(from_gguf)
    assert config.model == load_engine_config(from_hf).model
    assert config.source["format"] == "gguf" and list(config.source["files"]) == ["tiny.gguf"]
    assert (from_gguf / "chat_template.jinja").is_file()


def test_bad_gguf_files(tmp_path: Path, write_gguf: Callable[..., Path], tiny_checkpoint: Callable[..., Path]) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(CheckpointError, match="fake.gguf: not a GGUF file"):
        build_engine(fake, tmp_path / "e", progress=False)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(write_gguf(tiny_checkpoint("llama-gqa"), tmp_path / "ok.gguf").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated.gguf: corrupt GGUF header|extends past the end"):
        convert_gguf(truncated, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "e").exists()


def test_smollm2_gguf_header_is_read_fast_and_right() -> None:
    gguf = GGUFFile(default_checkpoint_path())
    try:
        assert gguf.metadata["general.architecture"] == "llama"
        assert len(gguf.metadata["tokenizer.ggml.tokens"]) == 49152
        assert gguf.tensors["blk.29.attn_k.weight"].shape == (3 * 64, 576)
        assert "output.weight" not in gguf.tensors  # tied embeddings
    finally:
        gguf.close()


def test_smollm2_converts_with_the_right_config(smollm2_checkpoint: Path) -> None:
    from engine.build.transforms import model_config_from_hf

    hf = json.loads((smollm2_checkpoint / "config.json").read_text())
    arch, model = model_config_from_hf(hf, json.loads((smollm2_checkpoint / "generation_config.json").read_text()))
    assert arch == "llama"
    assert (model.num_layers, model.hidden_size, model.num_heads, model.num_kv_heads, model.head_dim) == (30, 576, 9, 3, 64)
    assert (model.vocab_size, model.intermediate_size, model.tie_word_embeddings) == (49152, 1536, True)
    assert model.rope_theta == 100000.0 and model.rope_scaling is None and model.eos_token_ids == (2,)
    template = (smollm2_checkpoint / "chat_template.jinja").read_text()
    assert "<|im_start|>" in template and "add_generation_prompt" in template


def test_smollm2_checkpoint_answers_in_hugging_face(smollm2_checkpoint: Path) -> None:
    """The converted weights are the model's: HF greedy decoding answers a factual question."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint)
    model = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
