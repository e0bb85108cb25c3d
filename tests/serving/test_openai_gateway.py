"""The OpenAI gateway end to end: a real tritonserver serving a tiny engine, the real gateway
on loopback, and the real `openai` SDK (sync and async) and httpx as clients. Expected outputs
come from the in-process `LLM` on the same engine."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from engine import SamplingParams
from serving.openai.runner import GatewayServer
from serving.triton.launcher import TritonServer, pick_free_port

MODEL = "ensemble"
# Prompts chosen so that greedy outputs include multi-byte characters (asserted below).
PROMPTS = ["hello world", "日本語のテキストと中文文本混合。", "Emoji test 🚀🔥 are 👍🏽 and ✨"]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama with a long context, so that a request cut off by its client is certainly
    still generating when the client leaves (thousands of steps, not a few hundred)."""
    from tiny_models import make_checkpoint

    from engine.build.builder import BuildOptions, build_engine

    checkpoint = make_checkpoint("llama-gqa", tmp_path_factory.mktemp("ckpt-long"), max_position_embeddings=4096)
    options = BuildOptions(dtype="float32", max_batch_size=16, max_seq_len=4096)
    return build_engine(checkpoint, tmp_path_factory.mktemp("engines") / "tiny-long", options, progress=False)


@pytest.fixture(scope="module")
def triton(engine_dir: Path, triton_factory: Callable[..., TritonServer]) -> TritonServer:
    return triton_factory(engine_dir)


@pytest.fixture(scope="module")
def gateway(triton: TritonServer, engine_dir: Path) -> Iterator[GatewayServer]:
    with GatewayServer(triton.grpc_url, MODEL, engine_dir, port=0) as server:
        yield server


@pytest.fixture(scope="module")
def llm(engine_dir: Path) -> Any:
    from engine import LLM

    return LLM(engine_dir)


@pytest.fixture(scope="module")
def client(gateway: GatewayServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def max_seq_len(llm: Any) -> int:
    return int(llm.config.build.max_seq_len)


def greedy(llm: Any, prompts: list[str], **params: Any) -> list[Any]:
    return llm.generate(prompts, SamplingParams(temperature=0.0, **{"max_tokens": MAX_TOKENS, **params}))


def templated(llm: Any, messages: list[dict[str, str]]) -> str:
    return str(llm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def metric(metrics_url: str, name: str, labels: str = "") -> float:
    """Sum of a Prometheus metric's samples whose label text contains `labels`."""
    total, found = 0.0, False
    for line in httpx.get(metrics_url, timeout=5).text.splitlines():
        match = re.match(rf"^{name}(\{{[^}}]*\}})? (\S+)$", line)
        if match and labels in (match.group(1) or ""):
            total, found = total + float(match.group(2)), True
    assert found, f"{name} not on {metrics_url}"
    return total


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


# -- text and usage equal the in-process engine --------------------------------------------------
def test_completions_greedy_text_and_usage_match_llm(client: openai.OpenAI, llm: Any) -> None:
    expected = greedy(llm, PROMPTS)
    assert any(any(ord(ch) > 127 for ch in out.text) for out in expected), "no multi-byte output to test"
    response = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0)
    assert [c.index for c in response.choices] == [0, 1, 2]
    for choice, out in zip(response.choices, expected, strict=True):
        assert choice.text == out.text
        assert choice.finish_reason == out.finish_reason
    assert response.usage is not None
    assert response.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in expected)
    assert response.usage.completion_tokens == sum(len(o.token_ids) for o in expected)
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_chat_greedy_matches_llm_on_templated_prompt(client: openai.OpenAI, llm: Any) -> None:
    messages = [{"role": "system", "content": "answer briefly"}, {"role": "user", "content": "what is ML?"}]
    (expected,) = greedy(llm, [templated(llm, messages)])
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS,  # type: ignore[arg-type]
                                              temperature=0)
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert response.usage is not None
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (
        len(expected.prompt_token_ids), len(expected.token_ids))


def test_async_streamed_deltas_concatenate_to_the_text(gateway: GatewayServer, llm: Any) -> None:
    expected = greedy(llm, PROMPTS)

    async def run() -> list[tuple[str, str | None, Any]]:
        async with openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0) as aclient:

            async def one(prompt: str) -> tuple[str, str | None, Any]:
                stream = await aclient.completions.create(
                    model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True,
                    stream_options={"include_usage": True})
                text, reason, usage = "", None, None
                async for chunk in stream:
                    if chunk.choices:
                        text += chunk.choices[0].text
                        reason = chunk.choices[0].finish_reason or reason
                    if chunk.usage is not None:
                        usage = chunk.usage
                return text, reason, usage

            return await asyncio.gather(*(one(p) for p in PROMPTS))

    for (text, reason, usage), out in zip(asyncio.run(run()), expected, strict=True):
        assert text == out.text
        assert reason == out.finish_reason
        assert (usage.prompt_tokens, usage.completion_tokens) == (len(out.prompt_token_ids), len(out.token_ids))


def test_chat_stream_sync_matches_non_streamed(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "日本語のテキスト 🚀"}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS,  # type: ignore[arg-type]
                                          temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS,  # type: ignore[arg-type]
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == full.choices[0].message.content
    assert reasons == [full.choices[0].finish_reason]
    assert chunks[-1].usage == full.usage


def test_async_chat_matches_llm(gateway: GatewayServer, llm: Any) -> None:
    messages = [{"role": "user", "content": "hello"}]
    (expected,) = greedy(llm, [templated(llm, messages)])

    async def run() -> Any:
        async with openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0) as aclient:
            return await aclient.chat.completions.create(model=MODEL, messages=messages,  # type: ignore[arg-type]
                                                         max_completion_tokens=MAX_TOKENS, temperature=0)

    response = asyncio.run(run())
    assert response.choices[0].message.content == expected.text
    assert response.usage.completion_tokens == len(expected.token_ids)


def test_sse_body_ends_with_done(gateway: GatewayServer) -> None:
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 4, "temperature": 0, "stream": True}
    response = httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=30)
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.endswith("data: [DONE]\n\n")
    events = [e for e in response.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)


# -- sampling parameters reach the engine ----------------------------------------------------------
def test_stop_seed_and_ignore_eos_are_honoured(client: openai.OpenAI, llm: Any) -> None:
    (plain,) = greedy(llm, ["hello world"])
    stop = plain.text[len(plain.text) // 2:][:3]
    assert stop.strip(), f"greedy output too short to pick a stop string: {plain.text!r}"
    (stopped,) = greedy(llm, ["hello world"], stop=[stop])
    got = client.completions.create(model=MODEL, prompt="hello world", max_tokens=MAX_TOKENS, temperature=0, stop=stop)
    assert got.choices[0].text == stopped.text and got.choices[0].finish_reason == "stop"
    assert stop not in got.choices[0].text

    sampled = llm.generate(["hello world"], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9, seed=1234))[0]
    got = client.completions.create(model=MODEL, prompt="hello world", max_tokens=MAX_TOKENS, temperature=0.9,
                                    seed=1234, n=2)
    assert got.choices[0].text == sampled.text  # choice 0 uses the seed itself; choice 1 seed + 1

    got = client.completions.create(model=MODEL, prompt="hello world", max_tokens=40, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert got.usage is not None and got.usage.completion_tokens == 40
    assert got.choices[0].finish_reason == "length"


def test_logprobs_are_the_engines(client: openai.OpenAI, llm: Any) -> None:
    (expected,) = greedy(llm, ["hello world"], logprobs=0)
    got = client.completions.create(model=MODEL, prompt="hello world", max_tokens=MAX_TOKENS, temperature=0,
                                    logprobs=0)
    lp = got.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.tokens is not None
    assert lp.token_logprobs == pytest.approx(expected.logprobs, abs=1e-4)
    assert len(lp.tokens) == len(expected.token_ids)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=8, temperature=0, logprobs=True)
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == chat.usage.completion_tokens  # type: ignore[union-attr]
    assert all(entry.logprob <= 0 for entry in content)


# -- errors ----------------------------------------------------------------------------------------
def test_errors_have_status_and_shape_and_the_gateway_keeps_serving(
    client: openai.OpenAI, gateway: GatewayServer, max_seq_len: int
) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    assert not_found.value.status_code == 404 and not_found.value.code == "model_not_found"

    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2, temperature=-1)
    assert bad.value.param == "temperature"

    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=MODEL, prompt="the quick brown fox " * (max_seq_len // 2), max_tokens=2)
    assert str(max_seq_len) in too_long.value.message and too_long.value.code == "context_length_exceeded"

    raw = httpx.post(f"{gateway.url}/v1/chat/completions", json={"model": MODEL, "messages": "hi"}, timeout=10)
    assert raw.status_code == 400 and set(raw.json()["error"]) == {"message", "type", "param", "code"}

    ok = client.completions.create(model=MODEL, prompt="hello", max_tokens=3, temperature=0)
    assert ok.usage is not None and ok.usage.completion_tokens >= 1
    assert httpx.get(f"{gateway.url}/health", timeout=10).status_code == 200


def test_triton_down_is_503(engine_dir: Path) -> None:
    with GatewayServer(f"127.0.0.1:{pick_free_port()}", MODEL, engine_dir, port=0) as down:
        dead = openai.OpenAI(base_url=f"{down.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as info:
            dead.completions.create(model=MODEL, prompt="hello", max_tokens=2)
        assert info.value.status_code == 503
        assert httpx.get(f"{down.url}/health", timeout=10).status_code == 503


def test_api_key_is_enforced(triton: TritonServer, engine_dir: Path) -> None:
    with GatewayServer(triton.grpc_url, MODEL, engine_dir, port=0, api_key="s3cret") as secured:
        wrong = openai.OpenAI(base_url=f"{secured.url}/v1", api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.completions.create(model=MODEL, prompt="hello", max_tokens=2)
        assert httpx.get(f"{secured.url}/v1/models", timeout=10).status_code == 401
        right = openai.OpenAI(base_url=f"{secured.url}/v1", api_key="s3cret", max_retries=0)
        assert right.completions.create(model=MODEL, prompt="hello", max_tokens=2).choices[0].finish_reason


# -- cancellation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_aborts_and_kv_usage_returns_to_zero(
    gateway: GatewayServer, triton: TritonServer, max_seq_len: int, stream: bool
) -> None:
    kv = "kiln_kv_cache_usage_ratio"
    aborted_before = metric(triton.metrics_url, "kiln_requests_finished_total", 'finish_reason="abort"')
    generated_before = metric(triton.metrics_url, "kiln_generation_tokens_total")
    assert wait_for(lambda: metric(triton.metrics_url, kv) == 0.0)
    max_tokens = max_seq_len - 8
    body = {"model": MODEL, "prompt": "hello world", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    with httpx.Client(base_url=gateway.url, timeout=httpx.Timeout(30, read=0.5 if not stream else 30)) as http:
        if stream:
            with http.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200
                lines = response.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))
                assert json.loads(first[len("data: "):])["choices"][0]["finish_reason"] is None
                assert wait_for(lambda: metric(triton.metrics_url, kv) > 0.0), "KV gauge never moved"
        else:
            with pytest.raises(httpx.ReadTimeout):  # the client gives up while the engine generates
                http.post("/v1/completions", json=body)
    assert wait_for(lambda: metric(triton.metrics_url, kv) == 0.0), "KV blocks not freed after disconnect"
    assert wait_for(lambda: metric(
        triton.metrics_url, "kiln_requests_finished_total", 'finish_reason="abort"') == aborted_before + 1)
    generated = metric(triton.metrics_url, "kiln_generation_tokens_total") - generated_before
    assert generated < max_tokens, "the request ran to the end instead of being aborted"
