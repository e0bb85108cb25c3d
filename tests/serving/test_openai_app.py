"""The gateway's FastAPI app, driven in-process through httpx's ASGI transport: request
validation, error shapes, auth and the Triton-down path (a real gRPC client dialing a port where
nothing listens). Generation end to end is in test_openai_gateway.py."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from serving.openai.app import GatewayConfig, create_app
from serving.openai.prompts import PromptProcessor
from serving.triton.launcher import pick_free_port

MAX_SEQ_LEN = 64


@pytest.fixture(scope="module")
def tokenizer_dir(tiny_checkpoint: Callable[..., Path]) -> Path:
    return tiny_checkpoint("llama-gqa")


@pytest.fixture(scope="module")
def prompts(tokenizer_dir: Path) -> PromptProcessor:
    return PromptProcessor.from_dir(tokenizer_dir, MAX_SEQ_LEN)


@pytest.fixture(scope="module")
def no_template_prompts(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> PromptProcessor:
    bare = tmp_path_factory.mktemp("tokenizer-without-template")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, bare / name)
    return PromptProcessor.from_dir(bare, MAX_SEQ_LEN)


def call(
    prompts: PromptProcessor,
    method: str,
    path: str,
    api_key: str | None = None,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> httpx.Response:
    """One request to a fresh app whose Triton URL points at a closed port."""
    config = GatewayConfig(f"127.0.0.1:{pick_free_port()}", "ensemble", api_key)
    app = create_app(config, prompts)

    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
                return await client.request(method, path, headers=headers, **kwargs)
        finally:
            await app.state.upstream.close()

    return asyncio.run(run())


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": "ensemble", "prompt": "hello world", **fields}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "ensemble", "messages": [{"role": "user", "content": "hello"}], **fields}


def test_models_lists_the_served_model(prompts: PromptProcessor) -> None:
    body = call(prompts, "GET", "/v1/models").json()
    assert [m["id"] for m in body["data"]] == ["ensemble"]
    assert body["object"] == "list"


def test_unknown_model_is_404_in_openai_shape(prompts: PromptProcessor) -> None:
    for path, body in (("/v1/completions", completion(model="gpt-4")), ("/v1/chat/completions", chat(model="x"))):
        error = assert_error(call(prompts, "POST", path, json=body), 404, "model")
        assert error["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", completion(temperature=2.5), "temperature"),
        ("/v1/completions", completion(top_p=0), "top_p"),
        ("/v1/completions", completion(max_tokens=0), "max_tokens"),
        ("/v1/completions", completion(n=0), "n"),
        ("/v1/completions", completion(presence_penalty=3), "presence_penalty"),
        ("/v1/completions", completion(stop=["ok", ""]), "stop"),
        ("/v1/completions", completion(prompt=[1, 2, 3]), "prompt"),
        ("/v1/completions", completion(prompt=""), "prompt"),
        ("/v1/completions", completion(echo=True), "echo"),
        ("/v1/completions", completion(logprobs=3), "logprobs"),
        ("/v1/completions", completion(logit_bias={"5": 1.0}), "logit_bias"),
        ("/v1/completions", completion(min_tokens=20, max_tokens=4), "min_tokens"),
        ("/v1/completions", {"model": "ensemble"}, "prompt"),
        ("/v1/chat/completions", chat(messages=[]), "messages"),
        ("/v1/chat/completions", chat(messages=[{"role": "wizard", "content": "hi"}]), "messages.0.role"),
        ("/v1/chat/completions", chat(top_logprobs=2, logprobs=True), "top_logprobs"),
        ("/v1/chat/completions", chat(max_tokens=5, max_completion_tokens=6), "max_completion_tokens"),
        ("/v1/chat/completions", chat(tools=[{"type": "function"}]), "tools"),
        ("/v1/chat/completions", chat(stream_options={"include_usage": True}), "stream_options"),
    ],
)
def test_invalid_parameter_is_400_naming_it(prompts: PromptProcessor, path: str, body: dict, param: str) -> None:
    assert_error(call(prompts, "POST", path, json=body), 400, param)


def test_malformed_json_is_400(prompts: PromptProcessor) -> None:
    response = call(prompts, "POST", "/v1/completions", content=b"{not json",
                    headers={"Content-Type": "application/json"})
    assert "JSON" in assert_error(response, 400)["message"]


def test_prompt_too_long_is_400_naming_the_limit(prompts: PromptProcessor) -> None:
    long_prompt = "the quick brown fox " * 40  # far more than MAX_SEQ_LEN tokens
    error = assert_error(call(prompts, "POST", "/v1/completions", json=completion(prompt=long_prompt)), 400, "prompt")
    assert error["code"] == "context_length_exceeded"
    assert str(MAX_SEQ_LEN) in error["message"]


def test_prompt_plus_max_tokens_over_the_limit_is_400(prompts: PromptProcessor) -> None:
    response = call(prompts, "POST", "/v1/completions", json=completion(max_tokens=MAX_SEQ_LEN))
    error = assert_error(response, 400, "max_tokens")
    assert str(MAX_SEQ_LEN) in error["message"]


def test_chat_without_template_is_400(no_template_prompts: PromptProcessor) -> None:
    error = assert_error(call(no_template_prompts, "POST", "/v1/chat/completions", json=chat()), 400, "messages")
    assert error["code"] == "chat_template_missing"
    assert "chat template" in error["message"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", completion()),
        ("/v1/completions", completion(stream=True)),
        ("/v1/chat/completions", chat()),
        ("/v1/chat/completions", chat(stream=True)),
    ],
)
def test_triton_down_is_503(prompts: PromptProcessor, path: str, body: dict) -> None:
    error = assert_error(call(prompts, "POST", path, json=body), 503)
    assert error["type"] == "service_unavailable"
    assert "127.0.0.1" in error["message"]


def test_health_is_503_while_triton_is_down(prompts: PromptProcessor) -> None:
    assert_error(call(prompts, "GET", "/health"), 503)


def test_api_key_is_required_when_set(prompts: PromptProcessor) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
        error = assert_error(call(prompts, "GET", "/v1/models", api_key="sekret", headers=headers), 401)
        assert error["code"] == "invalid_api_key"
    assert_error(call(prompts, "POST", "/v1/completions", api_key="sekret", json=completion()), 401)
    ok = call(prompts, "GET", "/v1/models", api_key="sekret", headers={"Authorization": "Bearer sekret"})
    assert ok.status_code == 200


def test_unknown_route_is_404_in_openai_shape(prompts: PromptProcessor) -> None:
    assert_error(call(prompts, "GET", "/v1/engines"), 404)
