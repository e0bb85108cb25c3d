"""The Kiln python-backend model behind a real tritonserver, driven by real clients
(tritonclient gRPC streaming, HTTP generate / generate_stream), checked against the in-process
engine's greedy output. One server for the whole module."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from engine import SamplingParams
from engine.outputs import RequestOutput
from serving.triton.launcher import TritonServer

PROMPTS = ["What is ML?", "the quick brown fox", "hello world engines", "日本語のテキスト", "Emoji test 🚀 are"]
MAX_TOKENS = 24
MODEL = "ensemble"


@pytest.fixture(scope="module")
def llm(tiny_engine: Path) -> Any:
    from engine import LLM

    return LLM(tiny_engine)


def greedy(llm: Any, prompts: list[str], max_tokens: int = MAX_TOKENS) -> list[RequestOutput]:
    return llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0))


@pytest.fixture(scope="module")
def server(triton_factory: Callable[..., TritonServer], tiny_engine: Path) -> TritonServer:
    return triton_factory(tiny_engine)


def wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def settled(read: Callable[[], float], period: float = 0.5, timeout: float = 15.0) -> float:
    """A metric's value once it stops moving: the model publishes metrics every 200 ms, so a
    counter read right after other requests finished may not count them yet."""
    previous = read()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(period)
        current = read()
        if current == previous:
            return current
        previous = current
    return previous


def generate_http(server: TritonServer, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.http_url}/v2/models/{MODEL}/generate", json=body, timeout=60)


def sse_events(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line[len("data: "):]) for line in response.text.splitlines() if line.startswith("data: ")]


def test_grpc_streaming_matches_in_process_greedy(
    server: TritonServer, llm: Any, triton_client: SimpleNamespace
) -> None:
    for prompt, ref in zip(PROMPTS, greedy(llm, PROMPTS), strict=True):
        inputs = triton_client.inputs(prompt, MAX_TOKENS, stream=True)
        gen = asyncio.run(triton_client.stream_generate(server.grpc_url, inputs))
        assert gen.error is None
        assert gen.text == ref.text and len(gen.chunks) > 1  # streamed, not one blob
        assert (gen.finish_reason, gen.num_output_tokens, gen.num_input_tokens) == (
            ref.finish_reason, len(ref.token_ids), len(ref.prompt_token_ids))


def test_http_generate_returns_prompt_and_greedy_text(server: TritonServer, llm: Any) -> None:
    for prompt, ref in zip(PROMPTS[:3], greedy(llm, PROMPTS[:3]), strict=True):
        response = generate_http(server, {"text_input": prompt, "max_tokens": MAX_TOKENS})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["text_output"] == prompt + ref.text  # TensorRT-LLM: prompt included by default
        assert body["finish_reason"] == ref.finish_reason and body["num_output_tokens"] == len(ref.token_ids)
        response = generate_http(
            server, {"text_input": prompt, "max_tokens": MAX_TOKENS, "exclude_input_in_output": True})
        assert response.json()["text_output"] == ref.text


def test_http_generate_stream_sends_deltas_of_the_greedy_text(server: TritonServer, llm: Any) -> None:
    prompt, ref = PROMPTS[3], greedy(llm, PROMPTS[3:4])[0]
    response = httpx.post(f"{server.http_url}/v2/models/{MODEL}/generate_stream",
                          json={"text_input": prompt, "max_tokens": MAX_TOKENS, "stream": True}, timeout=60)
    events = sse_events(response)
    assert len(events) > 1 and "".join(e["text_output"] for e in events) == ref.text
    assert events[-1]["finish_reason"] == ref.finish_reason and "finish_reason" not in events[0]


def test_log_probs_are_returned_when_asked(server: TritonServer, llm: Any) -> None:
    ref = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=8, temperature=0, logprobs=0))[0]
    body = generate_http(server, {"text_input": PROMPTS[0], "max_tokens": 8, "return_log_probs": True,
                                  "exclude_input_in_output": True}).json()
    assert body["output_token_ids"] == ref.token_ids
    assert body["output_log_probs"] == pytest.approx(ref.logprobs, abs=1e-4)
    assert body["cum_log_probs"] == pytest.approx(ref.cumulative_logprob, abs=1e-3)


def test_32_concurrent_streams_are_batched_and_each_matches(
    server: TritonServer, llm: Any, triton_client: SimpleNamespace
) -> None:
    words = "the quick brown fox jumps over a lazy dog while machine learning models".split()
    prompts = [f"{words[i % len(words)]} {words[(i * 5) % len(words)]} {i}" for i in range(32)]
    refs = greedy(llm, prompts, max_tokens=32)

    async def all_streams() -> list[Any]:
        return await asyncio.gather(*(
            triton_client.stream_generate(server.grpc_url, triton_client.inputs(p, 32)) for p in prompts))

    gens = asyncio.run(all_streams())
    assert [g.text for g in gens] == [r.text for r in refs]
    # Earlier tests sent one request at a time; only in-flight batching reaches several.
    assert triton_client.scrape(server.metrics_url, "kiln_batch_size_max", model=MODEL) >= 4


def test_cancelled_grpc_stream_aborts_and_frees_the_kv_cache(
    server: TritonServer, triton_client: SimpleNamespace
) -> None:
    scrape = triton_client.scrape
    aborted = settled(lambda: scrape(server.metrics_url, "kiln_requests_finished_total", finish_reason="abort"))
    length = settled(lambda: scrape(server.metrics_url, "kiln_requests_finished_total", finish_reason="length"))
    inputs = triton_client.inputs("hello", 500, ignore_eos=True)  # ~1 s of work if never aborted
    gen = asyncio.run(triton_client.stream_generate(server.grpc_url, inputs, cancel_after_chunks=3))
    assert gen.finish_reason is None and len(gen.chunks) == 3
    assert wait_for(lambda: scrape(server.metrics_url, "kiln_requests_finished_total",
                                   finish_reason="abort") == aborted + 1)
    assert wait_for(lambda: scrape(server.metrics_url, "kiln_kv_cache_usage_ratio") == 0.0)
    assert scrape(server.metrics_url, "kiln_requests_finished_total", finish_reason="length") == length


def test_dropped_sse_connection_aborts_and_frees_the_kv_cache(
    server: TritonServer, triton_client: SimpleNamespace
) -> None:
    scrape = triton_client.scrape
    aborted = settled(lambda: scrape(server.metrics_url, "kiln_requests_finished_total", finish_reason="abort"))
    body = {"text_input": "hello", "max_tokens": 500, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.http_url}/v2/models/{MODEL}/generate_stream", json=body,
                      timeout=60) as response:
        events: list[str] = []
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line)
            if len(events) == 3:
                break
    assert len(events) == 3
    assert wait_for(lambda: scrape(server.metrics_url, "kiln_requests_finished_total",
                                   finish_reason="abort") == aborted + 1)
    assert wait_for(lambda: scrape(server.metrics_url, "kiln_kv_cache_usage_ratio") == 0.0)


BAD_HTTP_REQUESTS = [
    ({"max_tokens": 5}, "text_input"),
    ({"text_input": "hi", "max_tokens": 0}, "'max_tokens' must be >= 1, got 0"),
    ({"text_input": "hi", "max_tokens": -4}, "'max_tokens' must be >= 1, got -4"),
    ({"text_input": "hi", "max_tokens": 10_000}, "exceeds this engine's max_seq_len (512)"),
    ({"text_input": "hello " * 600, "max_tokens": 4}, "max_seq_len is 512"),
    ({"text_input": "", "max_tokens": 4}, "'text_input' is empty"),
    ({"text_input": "hi", "top_p": 3.0}, "top_p must be in (0, 1]"),
]


@pytest.mark.parametrize(("body", "message"), BAD_HTTP_REQUESTS)
def test_bad_http_request_gets_a_clear_error_and_the_next_one_works(
    server: TritonServer, llm: Any, body: dict[str, Any], message: str
) -> None:
    response = generate_http(server, body)
    assert response.status_code == 400 and message in response.json()["error"]
    good = generate_http(server, {"text_input": PROMPTS[0], "max_tokens": 8, "exclude_input_in_output": True})
    assert good.json()["text_output"] == greedy(llm, PROMPTS[:1], 8)[0].text


def test_wrong_json_type_is_refused_by_triton_and_the_next_request_works(server: TritonServer, llm: Any) -> None:
    # Triton parses generate's JSON against config.pbtxt before the model sees it; its message
    # names the type problem (not the field) and it answers 500 rather than 400.
    response = generate_http(server, {"text_input": "hi", "max_tokens": "many"})
    assert response.status_code >= 400 and "non-signed-integer as signed-integer" in response.json()["error"]
    good = generate_http(server, {"text_input": PROMPTS[0], "max_tokens": 8, "exclude_input_in_output": True})
    assert good.json()["text_output"] == greedy(llm, PROMPTS[:1], 8)[0].text


def test_bad_grpc_requests_get_clear_errors_and_the_stream_server_keeps_serving(
    server: TritonServer, llm: Any, triton_client: SimpleNamespace
) -> None:
    import tritonclient.grpc as grpcclient

    wrong_type = triton_client.inputs("hi", stream=True)
    tensor = grpcclient.InferInput("max_tokens", [1, 1], "FP32")
    tensor.set_data_from_numpy(__import__("numpy").array([[4.0]], dtype="float32"))
    cases = [
        (triton_client.inputs(b"\xff\xfe bad", 4), "not valid UTF-8: byte 0xff at position 0"),
        ([*wrong_type, tensor], "max_tokens"),
    ]
    ref = greedy(llm, PROMPTS[:1], 8)[0]
    for inputs, message in cases:
        gen = asyncio.run(triton_client.stream_generate(server.grpc_url, inputs))
        assert gen.error is not None and message in gen.error
        good = asyncio.run(triton_client.stream_generate(server.grpc_url, triton_client.inputs(PROMPTS[0], 8)))
        assert good.text == ref.text


def test_metrics_expose_kiln_metrics_that_move(server: TritonServer, triton_client: SimpleNamespace) -> None:
    scrape, url = triton_client.scrape, server.metrics_url
    page = httpx.get(url, timeout=10).text
    assert "nv_inference_request_success" in page  # Triton's own, next to Kiln's
    for name in ("kiln_num_requests_running", "kiln_num_requests_waiting", "kiln_kv_cache_usage_ratio",
                 "kiln_prefix_cache_hit_rate", "kiln_batch_size_last"):
        assert f"# TYPE {name} gauge" in page
    for name in ("kiln_time_to_first_token_seconds", "kiln_inter_token_latency_seconds",
                 "kiln_e2e_request_latency_seconds", "kiln_request_queue_time_seconds"):
        assert f"# TYPE {name} histogram" in page
    before = {name: settled(lambda name=name: scrape(url, name)) for name in (
        "kiln_prompt_tokens_total", "kiln_generation_tokens_total", "kiln_time_to_first_token_seconds_count",
        "kiln_e2e_request_latency_seconds_count", "kiln_request_queue_time_seconds_count",
        "kiln_inter_token_latency_seconds_count")}
    gen = asyncio.run(triton_client.stream_generate(server.grpc_url, triton_client.inputs("hello world", 10,
                                                                                          ignore_eos=True)))
    assert gen.num_output_tokens == 10
    expected = {"kiln_prompt_tokens_total": gen.num_input_tokens, "kiln_generation_tokens_total": 10,
                "kiln_time_to_first_token_seconds_count": 1, "kiln_e2e_request_latency_seconds_count": 1,
                "kiln_request_queue_time_seconds_count": 1, "kiln_inter_token_latency_seconds_count": 9}
    assert wait_for(lambda: all(scrape(url, n) - before[n] == d for n, d in expected.items())), {
        n: scrape(url, n) - before[n] for n in expected}
    assert scrape(url, "kiln_num_requests_running") == 0 and scrape(url, "kiln_kv_cache_usage_ratio") == 0


def test_prefix_cache_hit_rate_rises_when_a_long_prompt_repeats(
    server: TritonServer, triton_client: SimpleNamespace
) -> None:
    prompt = "machine learning models generate text tokens in batches with paged attention caches " * 3
    before = triton_client.scrape(server.metrics_url, "kiln_prefix_cache_hit_rate")
    for _ in range(2):
        asyncio.run(triton_client.stream_generate(server.grpc_url, triton_client.inputs(prompt, 4)))
    assert wait_for(lambda: triton_client.scrape(server.metrics_url, "kiln_prefix_cache_hit_rate") > before)
