"""The decode roofline's inputs: weight bytes per step (exact against the real models) and
the copy bandwidth probe."""

from __future__ import annotations

import json

import pytest

from benchmarks.bandwidth import (
    Bandwidth,
    kv_bytes_per_token,
    mbu,
    measure_copy_bandwidth,
    weight_bytes_per_decode_step,
)


@pytest.mark.parametrize("kind", ["llama-gqa", "llama-untied", "qwen2", "qwen3"])
def test_weight_bytes_equal_the_parameters_a_decode_step_reads(tiny_checkpoint, kind: str) -> None:
    import torch
    import transformers

    from engine.build.transforms import model_config_from_hf

    ckpt = tiny_checkpoint(kind)
    _, model_cfg = model_config_from_hf(json.loads((ckpt / "config.json").read_text()))
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    params = {name: p.numel() for name, p in hf.named_parameters()}  # tied weights are listed once
    embedding = hf.get_input_embeddings().weight.numel()
    # Every parameter is read once per step, except an untied input embedding (one row per token).
    expected = sum(params.values()) - (0 if model_cfg.tie_word_embeddings else embedding)
    assert weight_bytes_per_decode_step(model_cfg, "float32") == 4 * expected
    assert weight_bytes_per_decode_step(model_cfg, "bfloat16") == 2 * expected
    per_token = 2 * model_cfg.num_layers * model_cfg.num_kv_heads * model_cfg.head_dim * 4
    assert kv_bytes_per_token(model_cfg, "float32") == per_token


def test_copy_bandwidth_probe_reports_read_plus_write() -> None:
    bw = measure_copy_bandwidth("cpu", buffer_bytes=64 * 2**20, iters=3)
    assert bw.buffer_bytes == 64 * 2**20
    assert 0.5 < bw.gb_per_s < 2000  # any real machine
    # MBU arithmetic: reading 1 GB at 10 steps/s on a 20 GB/s machine uses half of it
    assert mbu(10**9, 10.0, Bandwidth("cpu", 20.0, 1, 1, 1)) == pytest.approx(0.5)
