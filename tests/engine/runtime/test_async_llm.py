"""The background loop batches concurrent requests, streams per token, and aborts cleanly."""

from __future__ import annotations

import asyncio
import threading

import pytest

from engine import LLM, AsyncLLM, SamplingParams

PROMPTS = ["hello world", "the quick brown fox", "Question: What is ML?", "one two three", "日本語", "🚀"]
PARAMS = SamplingParams(max_tokens=16, min_tokens=16, temperature=0)


@pytest.fixture(scope="module")
def alm(tiny_engine):
    engine = AsyncLLM(tiny_engine("llama-gqa"), check_invariants=True)
    yield engine
    engine.shutdown()


def test_concurrent_streams_match_offline_and_are_batched(alm, tiny_engine):
    expected = [o.token_ids for o in LLM(tiny_engine("llama-gqa")).generate(PROMPTS, PARAMS)]

    async def one(i: int) -> tuple[list[int], str, str]:
        deltas = []
        async for out in alm.generate(PROMPTS[i], PARAMS, f"req-{i}"):
            deltas.append(out.delta_text)
            last = out
        return last.token_ids, "".join(deltas), last.text

    async def all_of_them():
        return await asyncio.gather(*(one(i) for i in range(len(PROMPTS))))

    results = asyncio.run(all_of_them())
    assert [r[0] for r in results] == expected
    assert all(r[1] == r[2] for r in results)
    assert alm.stats().max_batch_size_seen > 1
    assert alm.stats().num_free_blocks == alm.stats().num_total_blocks


def test_leaving_the_stream_early_aborts_and_frees_blocks(alm):
    async def partial():
        n = 0
        stream = alm.generate("the quick brown fox", SamplingParams(max_tokens=200, ignore_eos=True), "early")
        async for _ in stream:
            n += 1
            if n == 3:
                break
        await stream.aclose()
        for _ in range(200):
            stats = alm.stats()
            if stats.num_running == 0 and stats.num_free_blocks == stats.num_total_blocks:
                return stats
            await asyncio.sleep(0.01)
        return alm.stats()

    stats = asyncio.run(partial())
    assert stats.num_running == 0 and stats.num_free_blocks == stats.num_total_blocks


def test_callback_api_and_abort_from_another_thread(alm):
    done = threading.Event()
    outputs = []

    def on_output(out):
        outputs.append(out)
        if out.finished:
            done.set()

    alm.add_request("cb", "hello world", SamplingParams(max_tokens=500, ignore_eos=True), on_output)
    while not outputs:
        threading.Event().wait(0.005)
    threading.Thread(target=alm.abort, args=("cb",)).start()
    assert done.wait(10)
    assert outputs[-1].finish_reason == "abort" and len(outputs[-1].token_ids) < 500


def test_shutdown_ends_in_flight_requests(tiny_engine):
    engine = AsyncLLM(tiny_engine("llama-gqa"))
    finished = threading.Event()
    reasons = []

    def on_output(out):
        if out.finished:
            reasons.append(out.finish_reason)
            finished.set()

    engine.add_request("x", "hello", SamplingParams(max_tokens=10_000, ignore_eos=True), on_output)
    engine.shutdown()
    assert finished.wait(5) and reasons == ["abort"]
    with pytest.raises(RuntimeError, match="shut down"):
        engine.add_request("y", "hello", SamplingParams(), on_output)
