"""HF config -> ModelConfig mapping, and the state-transform tables."""

from __future__ import annotations

import pytest

from engine.build.transforms import expected_shapes, model_config_from_hf, plan
from engine.errors import CheckpointError

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
}


def test_rope_parameters_of_transformers5_and_legacy_rope_scaling_normalize_alike() -> None:
    llama3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    v5 = {**LLAMA, "rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", **llama3}}
    v4 = {**LLAMA, "rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **llama3}}
    for hf in (v5, v4):
        _, model = model_config_from_hf(hf)
        assert model.rope_theta == 500000.0
        assert model.rope_scaling == {"rope_type": "llama3", **llama3}


def test_default_rope_is_none_and_linear_is_kept() -> None:
    _, plain = model_config_from_hf({**LLAMA, "rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}})
    assert (plain.rope_theta, plain.rope_scaling) == (1e4, None)
    _, linear = model_config_from_hf({**LLAMA, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    assert linear.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    with pytest.raises(CheckpointError, match="rope type 'yarn' is not supported"):
        model_config_from_hf({**LLAMA, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


def test_head_dim_eos_union_and_kv_heads_defaults() -> None:
    _, model = model_config_from_hf({**LLAMA, "eos_token_id": [5, 7]}, {"eos_token_id": [7, 9]})
    assert model.head_dim == 16 and model.eos_token_ids == (5, 7, 9)
    mha = {k: v for k, v in LLAMA.items() if k != "num_key_value_heads"}
    _, model = model_config_from_hf({**mha, "head_dim": 32, "eos_token_id": 3})
    assert model.num_kv_heads == 4 and model.head_dim == 32 and model.eos_token_ids == (3,)


def test_architecture_features() -> None:
    arch, qwen2 = model_config_from_hf({**LLAMA, "architectures": ["Qwen2ForCausalLM"]})
    assert (arch, qwen2.qkv_bias, qwen2.qk_norm) == ("qwen2", True, False)
    arch, qwen3 = model_config_from_hf({**LLAMA, "architectures": ["Qwen3ForCausalLM"]})
    assert (arch, qwen3.qkv_bias, qwen3.qk_norm) == ("qwen3", False, True)
    arch, mistral = model_config_from_hf({**LLAMA, "architectures": ["MistralForCausalLM"], "sliding_window": 128})
    assert arch == "mistral" and mistral.max_position_embeddings == 128  # full attention within one window


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "architecture 'GPT2LMHeadModel' is not supported; Kiln builds"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"attention_bias": True}, "attention_bias=true"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads"),
        ({"hidden_size": None}, "missing field 'hidden_size'"),
    ],
)
def test_unsupported_configs_name_the_field(change: dict, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        model_config_from_hf({**LLAMA, **change})


def test_plan_expands_wildcards_and_matches_expected_shapes() -> None:
    _, model = model_config_from_hf({**LLAMA, "tie_word_embeddings": False})
    names = [p.name for p in plan("llama", model)]
    assert names == list(dict.fromkeys(names)) and set(names) == set(expected_shapes(model))
    assert "lm_head.weight" in names and "layers.1.mlp.gate_up_proj.weight" in names
