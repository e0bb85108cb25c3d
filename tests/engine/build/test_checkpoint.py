"""Malformed checkpoints fail with a CheckpointError that names the file or tensor."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.build.builder import build_engine
from engine.build.checkpoint import HFCheckpoint
from engine.errors import CheckpointError


def test_reads_tensors_by_name_from_a_single_file(tiny_checkpoint: Callable[..., Path]) -> None:
    ckpt = tiny_checkpoint("llama-gqa")
    with HFCheckpoint(ckpt) as reader:
        assert reader.config["architectures"] == ["LlamaForCausalLM"]
        assert reader.shape("model.norm.weight") == (64,)
        expected = load_file(str(ckpt / "model.safetensors"))["model.layers.1.mlp.up_proj.weight"]
        assert torch.equal(reader.get("model.layers.1.mlp.up_proj.weight"), expected)
        with pytest.raises(CheckpointError, match="tensor 'model.nope' is missing"):
            reader.get("model.nope")


def break_no_config(ckpt: Path) -> str:
    (ckpt / "config.json").unlink()
    return f"{ckpt / 'config.json'}: missing"


def break_corrupt_json(ckpt: Path) -> str:
    (ckpt / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    return f"{ckpt / 'config.json'}: not valid JSON"


def break_architecture(ckpt: Path) -> str:
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "architectures": ["FalconForCausalLM"]}))
    return "architecture 'FalconForCausalLM' is not supported; Kiln builds .*LlamaForCausalLM"


def break_missing_tensor(ckpt: Path) -> str:
    tensors = load_file(str(ckpt / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(ckpt / "model.safetensors"))
    return "tensor 'model.layers.1.self_attn.k_proj.weight' is missing from the checkpoint"


def break_extra_tensor(ckpt: Path) -> str:
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    save_file(tensors, str(ckpt / "model.safetensors"))
    return r"tensors Kiln's llama model does not use: \['model.layers.0.self_attn.o_proj.bias'\]"


def break_pickle_only(ckpt: Path) -> str:
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not loaded")
    return "pytorch_model.bin: pickle checkpoints are not read by Kiln"


def break_missing_shard(ckpt: Path) -> str:
    tensors = load_file(str(ckpt / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    save_file({n: tensors[n] for n in names[:half]}, str(ckpt / "model-00001-of-00002.safetensors"))
    weight_map = {n: "model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors"
                  for i, n in enumerate(names)}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (ckpt / "model.safetensors").unlink()
    return "model-00002-of-00002.safetensors: shard listed in model.safetensors.index.json is missing"


def break_corrupt_safetensors(ckpt: Path) -> str:
    (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    return "model.safetensors: not a readable safetensors file"


def break_no_weights(ckpt: Path) -> str:
    (ckpt / "model.safetensors").unlink()
    return "no weights found"


def break_no_tokenizer(ckpt: Path) -> str:
    (ckpt / "tokenizer.json").unlink()
    return "no tokenizer"


@pytest.mark.parametrize(
    "breaker",
    [break_no_config, break_corrupt_json, break_architecture, break_missing_tensor, break_extra_tensor,
     break_pickle_only, break_missing_shard, break_corrupt_safetensors, break_no_weights, break_no_tokenizer],
)
def test_malformed_checkpoint_is_a_clear_error(
    breaker: Callable[[Path], str], checkpoint_copy: Callable[[str], Path], tmp_path: Path
) -> None:
    ckpt = checkpoint_copy("llama-gqa")
    message = breaker(ckpt)
    with pytest.raises(CheckpointError, match=message):
        build_engine(ckpt, tmp_path / "engine", progress=False)
    assert not (tmp_path / "engine").exists()
    assert [p.name for p in tmp_path.iterdir()] == [ckpt.name]  # no staging directory left behind


def test_not_a_directory(tmp_path: Path) -> None:
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(CheckpointError, match="expected a Hugging Face checkpoint directory or a .gguf file"):
        build_engine(tmp_path / "weights.txt", tmp_path / "e", progress=False)
    with pytest.raises(CheckpointError, match="no such file or directory"):
        build_engine(tmp_path / "absent", tmp_path / "e", progress=False)
