"""Chunked prefill, preemption and prefix-cache hits change how work is scheduled, never
the tokens that come out; the block pool is consistent after every step and empty at the end."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams

PROMPTS = [
    "the quick brown fox jumps over a lazy dog while machine learning models generate text",
    "hello world",
    "Question: What is ML? Answer:",
    "one two three four five six seven eight nine",
    "Emoji 🚀🔥 are fun and 日本語 too",
    "kernels engines serve requests in flight with paged attention caches",
]
GREEDY = SamplingParams(max_tokens=20, min_tokens=20, temperature=0)


@pytest.fixture(scope="module")
def engine_dir(tiny_engine):
    return tiny_engine("llama-gqa")


@pytest.fixture(scope="module")
def reference(engine_dir):
    llm = LLM(engine_dir, check_invariants=True, enable_prefix_caching=False)
    return [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]


def assert_pool_empty(llm: LLM) -> None:
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    bm.check_integrity([])


def test_chunked_prefill_gives_identical_tokens(engine_dir, reference):
    llm = LLM(engine_dir, check_invariants=True, max_num_tokens=7)
    steps_before = llm.engine.stats().num_steps
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == reference
    stats = llm.engine.stats()
    # Prompts of up to ~20 tokens at 7 tokens per step: the budget really was enforced.
    assert stats.num_steps - steps_before > 20 + 2
    assert llm.engine.stats().last_num_tokens <= 7
    assert_pool_empty(llm)


def test_preemption_gives_identical_tokens(engine_dir, reference):
    # 10 blocks of 16 tokens cannot hold six ~40-token sequences at once.
    llm = LLM(engine_dir, check_invariants=True, num_kv_blocks=5, enable_prefix_caching=False)
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == reference
    assert llm.engine.stats().num_preemptions > 0
    assert_pool_empty(llm)


def test_prefix_cache_hits_give_identical_tokens(engine_dir):
    system = "You are a helpful engine that serves requests in flight with paged attention caches. " * 2
    prompts = [system + p for p in PROMPTS]
    cold = LLM(engine_dir, check_invariants=True, enable_prefix_caching=False).generate(prompts, GREEDY)
    llm = LLM(engine_dir, check_invariants=True)
    first = llm.generate(prompts[:1], GREEDY)
    warm = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in first + warm[1:]] == [o.token_ids for o in cold[:1] + cold[1:]]
    stats = llm.engine.stats()
    assert stats.prefix_cache_hits >= 16 * len(prompts)  # every prompt reused the shared blocks
    assert all(o.num_cached_tokens > 0 for o in warm)
    assert_pool_empty(llm)


def test_max_batch_size_limits_running_requests(engine_dir, reference):
    llm = LLM(engine_dir, check_invariants=True, max_batch_size=2)
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == reference
    assert llm.engine.stats().max_batch_size_seen == 2


def test_abort_frees_blocks_at_once(engine_dir):
    llm = LLM(engine_dir, check_invariants=True)
    engine = llm.engine
    engine.add_request("a", PROMPTS[0], SamplingParams(max_tokens=50, temperature=0))
    engine.add_request("b", PROMPTS[1], SamplingParams(max_tokens=50, temperature=0))
    for _ in range(3):
        engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    final = engine.abort_request("a")
    assert final is not None and final.finished and final.finish_reason == "abort"
    engine.abort_request("b")
    assert not engine.has_unfinished_requests()
    assert_pool_empty(llm)
    assert engine.abort_request("unknown") is None
