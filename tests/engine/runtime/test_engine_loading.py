"""A broken engine directory fails to load with an error that names the file and the problem."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import LLM, EngineLoadError


@pytest.fixture
def engine_copy(tiny_engine, tmp_path):
    return shutil.copytree(tiny_engine("llama-gqa"), tmp_path / "engine")


def edit_config(engine_dir, **changes):
    path = engine_dir / "config.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


def test_missing_rank_file(engine_copy):
    (engine_copy / "rank0.safetensors").unlink()
    with pytest.raises(EngineLoadError, match=r"rank0\.safetensors: missing rank file"):
        LLM(engine_copy)


def test_wrong_format_version(engine_copy):
    edit_config(engine_copy, format_version=99)
    with pytest.raises(EngineLoadError, match="format_version is 99"):
        LLM(engine_copy)


def test_corrupt_config_json(engine_copy):
    (engine_copy / "config.json").write_text('{"format_version": 1, "model": ')
    with pytest.raises(EngineLoadError, match="config.json: not valid JSON"):
        LLM(engine_copy)


def test_wrong_field_value_is_named(engine_copy):
    raw = json.loads((engine_copy / "config.json").read_text())
    raw["build"]["kv_block_size"] = 0
    (engine_copy / "config.json").write_text(json.dumps(raw))
    with pytest.raises(EngineLoadError, match=r"build\.kv_block_size must be a positive integer"):
        LLM(engine_copy)


def test_wrong_tensor_shape(engine_copy):
    path = engine_copy / "rank0.safetensors"
    tensors = load_file(str(path))
    tensors["layers.0.mlp.down_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(path))
    with pytest.raises(EngineLoadError, match=r"layers\.0\.mlp\.down_proj\.weight has shape \(3, 3\)"):
        LLM(engine_copy)


def test_missing_tensor(engine_copy):
    path = engine_copy / "rank0.safetensors"
    tensors = load_file(str(path))
    del tensors["norm.weight"]
    save_file(tensors, str(path))
    with pytest.raises(EngineLoadError, match=r"missing tensor\(s\) \['norm.weight'\]"):
        LLM(engine_copy)


def test_not_an_engine(tmp_path):
    with pytest.raises(EngineLoadError, match="no such engine or checkpoint"):
        LLM(tmp_path / "nowhere")
    with pytest.raises(EngineLoadError, match="neither a Kiln engine nor a Hugging Face checkpoint"):
        LLM(tmp_path)
