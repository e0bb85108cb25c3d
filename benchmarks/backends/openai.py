"""OpenAI-compatible backends over `httpx` streaming: `openai` (`/v1/completions`) and
`openai-chat` (`/v1/chat/completions`), the requests `vllm bench serve` sends.

`--url` is the API base including `/v1` (e.g. `http://127.0.0.1:9000/v1`). Every request asks
for `stream_options.include_usage`, so the server's `completion_tokens` is the output count
when it sends usage; `ignore_eos: true` is vLLM's extension (Kiln's gateway honours it).
A completion chunk with `choices` counts as output even when its text is empty (vLLM); a chat
chunk counts when it carries content or a finish reason — the opening chunk that only
announces the assistant role is not a token. The bearer token comes from `--api-key`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from benchmarks.backends.base import Backend, BackendOptions, error_text, register_backend
from benchmarks.datasets import SampleRequest
from benchmarks.errors import BenchmarkError
from benchmarks.metrics import RequestRecord


def _serving_backend(models: Any, model: str) -> str | None:
    """What serves `model`, from a GET /models response: Kiln's gateway adds "backend" (kiln |
    vllm | hf); other servers say at most `owned_by` (vLLM's: "vllm")."""
    try:
        entries = models.json().get("data") or []
    except (ValueError, AttributeError):
        return None
    for entry in entries:
        if isinstance(entry, dict) and entry.get("id") == model:
            value = entry.get("backend") or entry.get("owned_by")
            return str(value) if value else None
    return None


class OpenAIBackend(Backend):
    """Shared plumbing: one pooled `httpx.AsyncClient`, SSE parsing, usage."""

    endpoint = "/completions"

    def __init__(self, options: BackendOptions) -> None:
        super().__init__(options)
        self.client: Any = None
        base = options.url.rstrip("/")
        self.base_url = base if "://" in base else "http://" + base

    async def start(self) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {self.options.api_key}"} if self.options.api_key else {}
        self.client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(self.options.request_timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        )
        try:
            response = await self.client.get(f"{self.base_url}/models")
        except httpx.HTTPError as exc:
            await self.close()
            raise BenchmarkError(f"--url {self.base_url}: cannot reach the server ({error_text(exc)})") from None
        if response.status_code != 200:
            await self.close()
            raise BenchmarkError(
                f"--url {self.base_url}: GET /models -> HTTP {response.status_code} {response.text[:200]}"
            )
        self.serving_backend = _serving_backend(response, self.options.model)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    def payload(self, request: SampleRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.options.model,
            "prompt": request.prompt,
            "max_tokens": request.expected_output_len,
            "temperature": self.options.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.options.ignore_eos:
            body["ignore_eos"] = True
        return body

    def chunk_text(self, choice: dict[str, Any]) -> str | None:
        """The output text of one streamed choice, or None when it carries no output."""
        text = choice.get("text")
        return text if isinstance(text, str) else ""

    async def _events(self, response: Any) -> AsyncIterator[dict[str, Any]]:
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators and ": ping" comments
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                return
            yield json.loads(data)

    async def send(self, request: SampleRequest, record: RequestRecord) -> None:
        assert self.client is not None, "start() first"
        url = f"{self.base_url}{self.endpoint}"
        try:
            async with self.client.stream("POST", url, json=self.payload(request)) as response:
                if response.status_code != 200:
                    body = (await response.aread()).decode("utf-8", errors="replace")
                    record.error = f"HTTP {response.status_code}: {body[:300]}"
                    return
                async for event in self._events(response):
                    if "error" in event:
                        record.error = f"server error: {event['error']}"
                        return
                    choices = event.get("choices") or []
                    if choices:
                        text = self.chunk_text(choices[0])
                        if text is not None:
                            record.on_output(text, self.now())
                    usage = event.get("usage")
                    if usage and usage.get("completion_tokens") is not None:
                        record.server_output_tokens = int(usage["completion_tokens"])
                        if usage.get("prompt_tokens") is not None:
                            record.prompt_len = int(usage["prompt_tokens"])
        except Exception as exc:  # a broken connection is a failed request, not a crash
            record.error = error_text(exc)
            return
        if record.ttft is None:
            record.error = "the event stream ended without any output chunk"
        else:
            record.success = True


@register_backend("openai")
class OpenAICompletionsBackend(OpenAIBackend):
    endpoint = "/completions"


@register_backend("openai-chat")
class OpenAIChatBackend(OpenAIBackend):
    endpoint = "/chat/completions"

    def payload(self, request: SampleRequest) -> dict[str, Any]:
        body = super().payload(request)
        del body["prompt"], body["max_tokens"]
        body["messages"] = [{"role": "user", "content": request.prompt}]
        body["max_completion_tokens"] = request.expected_output_len
        return body

    def chunk_text(self, choice: dict[str, Any]) -> str | None:
        content = (choice.get("delta") or {}).get("content")
        if content:
            return str(content)
        return "" if choice.get("finish_reason") else None
