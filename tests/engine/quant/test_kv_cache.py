"""Quantized paged KV cache (int8 / fp8 with per token-head scales): twice the blocks of a 16-bit
cache for the same memory, and outputs that stay close to the unquantized cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.build.builder import BuildOptions, build_engine
from engine.quant.kv_cache import dequantize_kv, kv_storage, quantize_kv
from engine.runtime.kv_pool import plan_kv_pool
from engine.runtime.model_runner import KVCacheSpec


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_quantize_kv_round_trip(kind: str) -> None:
    x = torch.randn(7, 3, 64) * torch.logspace(-2, 2, 7).view(7, 1, 1)  # very different token scales
    dtype, scale_dtype = kv_storage(kind, torch.bfloat16)
    values, scales = quantize_kv(x, dtype)
    assert values.dtype == dtype and scales.dtype == scale_dtype == torch.float16 and scales.shape == (7, 3)
    back = dequantize_kv(values, scales, torch.float32)
    rel = ((back - x).abs().amax(-1) / x.abs().amax(-1)).max()
    assert rel <= (0.005 if kind == "int8" else 0.07)  # half an int8 step; e4m3's 3 mantissa bits


@pytest.mark.parametrize("head_dim", [64, 128])
def test_quantized_cache_doubles_blocks_for_the_same_memory(head_dim: int) -> None:
    bf16 = KVCacheSpec(30, 3, head_dim, 16, torch.bfloat16)
    int8 = KVCacheSpec(30, 3, head_dim, 16, *kv_storage("int8", torch.bfloat16))
    memory = 256 << 20
    plain = plan_kv_pool(bf16, 1, 16, torch.device("cpu"), memory_bytes=memory).num_blocks
    quant = plan_kv_pool(int8, 1, 16, torch.device("cpu"), memory_bytes=memory).num_blocks
    assert int8.bytes_per_block == 30 * 2 * 16 * 3 * (head_dim + 2)
    assert quant / plain >= 1.93  # 2 * hd / (hd + 2): 1.94 at hd 64, 1.97 at hd 128


@pytest.fixture(scope="module")
def kv_engines(quant_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kv")
    return {kind: build_engine(quant_checkpoint, root / kind, BuildOptions(dtype="float32", kv_cache_dtype=kind),
                               progress=False) for kind in ("auto", "int8", "fp8")}


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_quantized_cache_keeps_outputs_close(kv_engines: dict[str, Path], kind: str) -> None:
    from engine import LLM, SamplingParams

    base, quant = LLM(kv_engines["auto"], max_seq_len=256), LLM(kv_engines[kind], max_seq_len=256)
    assert quant.engine.runner.kv_caches.dtype == kv_storage(kind, torch.float32)[0]
    text = "A banker is a fellow who lends you his umbrella when the sun is shining and wants it back"
    ids = base.tokenizer(text).input_ids
    lb, lq = base.engine.score(ids), quant.engine.score(ids)
    assert (lb.argmax(-1) == lq.argmax(-1)).float().mean() >= 0.9
    assert (lb - lq).abs().max() <= (0.05 if kind == "int8" else 0.3) * lb.abs().max()
    # Greedy decoding reads K/V back from the quantized cache at every step (and across chunks).
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    prompts = ["A classic is something that everyone", "A horse! A horse!", "The man who"]
    outs_b = base.generate(prompts, params)
    outs_q = quant.generate(prompts, params)
    agree = [sum(a == b for a, b in zip(x.token_ids, y.token_ids, strict=True)) / 16
             for x, y in zip(outs_b, outs_q, strict=True)]
    assert sum(agree) / len(agree) >= (0.7 if kind == "int8" else 0.4), agree
    stats = quant.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks  # every block returned
