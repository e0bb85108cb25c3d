"""Tensor-parallel engines (engine/distributed/): TP=2 and TP=4 agree with TP=1, and faults
surface promptly with every worker process gone."""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from engine import LLM, SamplingParams
from engine.distributed.common import TensorParallelError
from engine.errors import EngineLoadError
from engine.parallel import get_tp_size
from engine.runtime.llm_engine import LLMEngine

KINDS = ("llama-mha", "llama-gqa", "llama-mqa")
PROMPTS = ["hello world", "the quick brown fox jumps over a lazy dog while machine learning",
           "what is why how many numbers one two three"]
# Long enough (> 2 KV blocks of 16) that a second run hits the prefix cache and prefills a
# chunk that continues a cached context.
LONG_PROMPT = " ".join(["tokens batches kernels engines serve requests in flight"] * 6)
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
SCORE_IDS = list(range(3, 60))


def _outputs(llm: LLM) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy tokens of PROMPTS (batched), LONG_PROMPT twice (prefix cache), and all-position logits."""
    tokens = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    for _ in range(2):
        tokens.append(llm.generate([LONG_PROMPT], GREEDY)[0].token_ids)
    assert llm.engine.stats().prefix_cache_hits > 0
    return tokens, llm.engine.score(SCORE_IDS)


def _run(engine_dir: Path) -> tuple[list[list[int]], torch.Tensor]:
    llm = LLM(engine_dir)
    try:
        return _outputs(llm)
    finally:
        llm.engine.close()
        assert not dist.is_initialized() and get_tp_size() == 1  # close() restored the process state


def _assert_matches(got: tuple[list[list[int]], torch.Tensor], ref: tuple[list[list[int]], torch.Tensor]) -> None:
    assert got[0] == ref[0]
    assert got[1].shape == ref[1].shape
    assert (got[1] - ref[1]).abs().max().item() <= 1e-4


@pytest.fixture(scope="module")
def reference(tp_engine: Callable[..., Path]) -> Callable[[str], tuple[list[list[int]], torch.Tensor]]:
    cache: dict[str, tuple[list[list[int]], torch.Tensor]] = {}

    def get(kind: str) -> tuple[list[list[int]], torch.Tensor]:
        if kind not in cache:
            cache[kind] = _run(tp_engine(kind, 1))
        return cache[kind]

    return get


@pytest.mark.parametrize(("kind", "tp"), [(k, tp) for k in KINDS for tp in (2, 4) if (k, tp) != ("llama-gqa", 4)])
def test_greedy_tokens_and_logits_match_tp1(kind: str, tp: int, tp_engine: Callable[..., Path],
                                            reference: Callable[[str], tuple[list[list[int]], torch.Tensor]],
                                            child_pids: Callable[[int], list[int]]) -> None:
    _assert_matches(_run(tp_engine(kind, tp)), reference(kind))
    assert not child_pids(os.getpid())  # the workers are gone


def test_gqa_tp4_matches_tp1_then_a_killed_worker_fails_it_within_seconds(
        tp_engine: Callable[..., Path], reference: Callable[[str], tuple[list[list[int]], torch.Tensor]],
        child_pids: Callable[[int], list[int]], process_gone: Callable[[int], bool]) -> None:
    """One TP=4 engine (GQA with 2 KV heads: replicated) through its whole life: parity, one
    engine per process, then a worker killed mid-generation."""
    ref = reference("llama-gqa")
    llm = LLM(tp_engine("llama-gqa", 4))
    engine = llm.engine
    try:
        _assert_matches(_outputs(llm), ref)
        with pytest.raises(TensorParallelError, match="one tensor-parallel engine per process"):
            LLMEngine(tp_engine("llama-gqa", 2))
        with pytest.raises(EngineLoadError, match="a tensor-parallel engine is open in this process"):
            LLMEngine(tp_engine("llama-gqa", 1))
        workers = dict(engine.runner._workers.procs)  # type: ignore[union-attr]
        assert sorted(workers) == [1, 2, 3]
        assert sorted(child_pids(os.getpid())) == sorted(p.pid for p in workers.values())
        for i in range(3):
            engine.add_request(f"r{i}", PROMPTS[i], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
        for _ in range(3):
            engine.step()
        os.kill(workers[2].pid, signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(TensorParallelError, match=r"worker rank 2 killed by signal 9"):
            while time.monotonic() - killed < 30:
                engine.step()
        assert time.monotonic() - killed < 5.0
        deadline = time.monotonic() + 5
        while not all(process_gone(p.pid) for p in workers.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(process_gone(p.pid) for p in workers.values())
        with pytest.raises(TensorParallelError, match="tensor-parallel engine failed"):
            engine.step()  # stays failed, with the same clear reason
    finally:
        engine.close()
    assert not dist.is_initialized() and get_tp_size() == 1 and not child_pids(os.getpid())


def test_worker_that_fails_to_start_is_a_clear_error(tp_engine: Callable[..., Path], tmp_path: Path,
                                                     child_pids: Callable[[int], list[int]]) -> None:
    broken = tmp_path / "engine"
    shutil.copytree(tp_engine("llama-gqa", 2), broken)
    (broken / "rank1.safetensors").write_bytes(b"not safetensors")
    started = time.monotonic()
    with pytest.raises(TensorParallelError, match=r"worker rank 1 failed to start: EngineLoadError: .*rank1\.safetensors"):
        LLMEngine(broken)
    assert time.monotonic() - started < 30
    assert not dist.is_initialized() and get_tp_size() == 1 and not child_pids(os.getpid())
