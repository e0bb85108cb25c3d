"""build_engine: every tiny kind builds into an engine whose tensors are the HF tensors, fused."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from engine.build.builder import BuildOptions, build_engine
from engine.build.transforms import expected_shapes
from engine.config import load_engine_config
from engine.errors import BuildError, CheckpointError

KINDS = ["llama-mha", "llama-gqa", "llama-mqa", "llama3-rope", "llama-untied", "mistral", "qwen2", "qwen3"]


def kiln_from_hf(hf: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """What the Kiln tensor `name` must equal, written out independently of the transform tables."""
    if name.startswith("layers."):
        i, rest = name.split(".")[1], name.split(".", 2)[2]
        p = f"model.layers.{i}."
        fused = {
            "self_attn.qkv_proj.weight": ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
            "self_attn.qkv_proj.bias": ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"],
            "mlp.gate_up_proj.weight": ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
        }
        return torch.cat([hf[p + s] for s in fused.get(rest, [rest])], dim=0)
    return hf[name if name == "lm_head.weight" else f"model.{name}"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_builds_to_fused_hf_tensors(kind: str, tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(kind)
    engine_dir = build_engine(ckpt, tmp_path / "engine", progress=False)
    config = load_engine_config(engine_dir)
    kiln = load_file(str(engine_dir / "rank0.safetensors"))
    hf = load_file(str(ckpt / "model.safetensors"))
    assert {n: tuple(t.shape) for n, t in kiln.items()} == expected_shapes(config.model)
    for name, tensor in kiln.items():
        assert torch.equal(tensor, kiln_from_hf(hf, name)), name
    for file_name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (engine_dir / file_name).read_bytes() == (ckpt / file_name).read_bytes()


def test_config_fields_map_per_architecture(tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    def build(kind: str) -> object:
        return load_engine_config(build_engine(tiny_checkpoint(kind), tmp_path / kind, progress=False))

    llama3 = build("llama3-rope")
    assert llama3.architecture == "llama" and llama3.model.rope_theta == 500000.0
    assert llama3.model.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    qwen2, qwen3, untied = build("qwen2"), build("qwen3"), build("llama-untied")
    assert (qwen2.architecture, qwen2.model.qkv_bias, qwen2.model.qk_norm) == ("qwen2", True, False)
    assert (qwen3.architecture, qwen3.model.qk_norm, qwen3.model.head_dim) == ("qwen3", True, 16)
    assert untied.model.tie_word_embeddings is False and qwen2.model.tie_word_embeddings is True
    assert (qwen2.model.num_heads, qwen2.model.num_kv_heads, qwen2.model.eos_token_ids) == (4, 2, (2,))


def test_limits_dtype_report_and_source(tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    ckpt = tiny_checkpoint("llama-gqa")
    options = BuildOptions(dtype="bfloat16", max_batch_size=8, max_seq_len=256, kv_block_size=32)
    engine_dir = build_engine(ckpt, tmp_path / "e", options, progress=False)
    build = load_engine_config(engine_dir).build
    assert (build.dtype, build.max_batch_size, build.max_seq_len, build.max_num_tokens, build.kv_block_size) == (
        "bfloat16", 8, 256, 2048, 32)
    with safe_open(str(engine_dir / "rank0.safetensors"), "pt") as f:
        assert {f.get_slice(n).get_dtype() for n in f.keys()} == {"BF16"}
    report = json.loads((engine_dir / "build_report.json").read_text())
    hf_params = sum(t.numel() for t in load_file(str(ckpt / "model.safetensors")).values())
    assert report["num_parameters"] == hf_params and report["dtype"] == "bfloat16"
    assert report["bytes_per_rank"]["rank0.safetensors"] == 2 * hf_params and report["build_seconds"] >= 0
    source = json.loads((engine_dir / "config.json").read_text())["source"]
    assert source["checkpoint"] == str(ckpt.resolve()) and set(source["files"]) == {
        "config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "chat_template.jinja"}
    assert all(len(h) == 64 for h in source["files"].values())


def test_default_limits_come_from_the_checkpoint(tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    build = load_engine_config(build_engine(tiny_checkpoint("llama-gqa"), tmp_path / "e", progress=False)).build
    assert (build.max_seq_len, build.max_num_tokens, build.dtype) == (512, 2048, "float32")  # max_position_embeddings=512
    with pytest.raises(BuildError, match="--max-seq-len 1024 exceeds the model's context of 512"):
        build_engine(tiny_checkpoint("llama-gqa"), tmp_path / "f", BuildOptions(max_seq_len=1024), progress=False)


def test_default_output_dir_and_overwrite_rules(
    tiny_checkpoint: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = tiny_checkpoint("llama-mqa")
    monkeypatch.chdir(tmp_path)
    first = build_engine(ckpt, options=BuildOptions(dtype="float16"), progress=False)
    assert first == tmp_path / "engines" / f"{ckpt.name}-float16-tp1"
    (first / "stale.txt").write_text("from an older build")
    assert build_engine(ckpt, first, BuildOptions(dtype="float16"), progress=False) == first  # an engine: replaced
    assert not (first / "stale.txt").exists()
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(BuildError, match="is not a Kiln engine directory; refusing to overwrite"):
        build_engine(ckpt, precious, progress=False)
    assert (precious / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines", "precious"]  # no staging dirs left


def test_sharded_checkpoint_builds_the_same_engine(tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    ckpt = tiny_checkpoint("qwen2")
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(ckpt).save_pretrained(sharded, max_shard_size="50KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (sharded / name).write_bytes((ckpt / name).read_bytes())
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 2
    a = load_file(str(build_engine(ckpt, tmp_path / "a", progress=False) / "rank0.safetensors"))
    b = load_file(str(build_engine(sharded, tmp_path / "b", progress=False) / "rank0.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_config_that_does_not_match_the_weights(checkpoint_copy: Callable[[str], Path], tmp_path: Path) -> None:
    ckpt = checkpoint_copy("llama-gqa")
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(CheckpointError, match=r"'layers.0.mlp.gate_up_proj.weight' .* has shape \(256, 64\), "
                                              r"config.json implies \(192, 64\)"):
        build_engine(ckpt, tmp_path / "e", progress=False)
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("dtype", "int3", "--dtype 'int3' is not one of"), ("max_batch_size", 0, "--max-batch-size must be a positive"),
     ("kv_block_size", -16, "--kv-block-size must be a positive")],
)
def test_bad_options_name_the_flag(field: str, value: object, message: str) -> None:
    with pytest.raises(BuildError, match=message):
        BuildOptions(**{field: value})


def test_impossible_tensor_parallel_split_is_refused(tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="--tp 3 does not divide the model's 4 attention heads"):
        build_engine(tiny_checkpoint("llama-gqa"), tmp_path / "e", BuildOptions(tp_size=3), progress=False)
    assert not (tmp_path / "e").exists()


def test_merged_adapters_are_recorded_in_source(checkpoint_copy: Callable[[str], Path], tmp_path: Path) -> None:
    ckpt = checkpoint_copy("llama-gqa")
    adapter = {"path": "/adapters/a", "peft_type": "LORA", "sha256": "0" * 64, "r": 8, "lora_alpha": 16}
    (ckpt / "kiln_merge.json").write_text(json.dumps({"base": "/base", "adapters": [adapter]}))
    source = load_engine_config(build_engine(ckpt, tmp_path / "e", progress=False)).source
    assert source["adapters"] == [adapter] and source["merged_base"] == "/base"
