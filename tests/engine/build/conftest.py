"""Fixtures of the builder tests (`smollm2_checkpoint` lives in tests/conftest.py):
`checkpoint_copy` (a tiny checkpoint a test may break) and `write_gguf` (a GGUF written from a tiny
HF llama checkpoint the way llama.cpp's converter does)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file


@pytest.fixture
def checkpoint_copy(tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> Callable[[str], Path]:
    """`checkpoint_copy(kind)` -> a private copy of a tiny checkpoint that a test may break."""

    def copy(kind: str = "llama-gqa") -> Path:
        return Path(shutil.copytree(tiny_checkpoint(kind), tmp_path / f"ckpt-{kind}"))

    return copy

LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py), verbatim in numpy."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def gguf_name(hf_name: str) -> str:
    if hf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{LAYER_NAMES[rest]}"


def write_llama_gguf(checkpoint: Path, out: Path, quant: str | None = None) -> Path:
    """GGUF of a tiny llama checkpoint; `quant` ("Q8_0") quantizes the 2-D projection weights."""
    import gguf

    cfg = json.loads((checkpoint / "config.json").read_text())
    tok = json.loads((checkpoint / "tokenizer.json").read_text())
    rope = cfg.get("rope_parameters") or {}
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head

    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if quant is None else gguf.LlamaFileType.MOSTLY_Q8_0)

    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {t["content"] for t in tok["added_tokens"] if t["special"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t, _ in vocab])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    writer.add_bos_token_id(cfg["bos_token_id"])
    writer.add_eos_token_id(cfg["eos_token_id"])
    writer.add_pad_token_id(cfg["pad_token_id"])
    writer.add_chat_template((checkpoint / "chat_template.jinja").read_text())

    for hf_name, tensor in load_file(str(checkpoint / "model.safetensors")).items():
        data = tensor.astype(np.float32)
        if hf_name.endswith("q_proj.weight"):
            data = llama_cpp_permute(data, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = llama_cpp_permute(data, n_kv)
        if quant is not None and data.ndim == 2 and "embed" not in hf_name:
            qtype = gguf.GGMLQuantizationType[quant]
            writer.add_tensor(gguf_name(hf_name), gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name(hf_name), data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="session")
def write_gguf() -> Callable[..., Path]:
    """`write_gguf(checkpoint, out_path, quant=None)` -> a llama.cpp-style GGUF of the checkpoint."""
    return write_llama_gguf
