"""JSON bodies of OpenAI responses and stream chunks (completions and chat), built from the
gateway's per-choice results. Pure functions of their inputs: ids and timestamps are passed in."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ChoiceState:
    """What one choice has produced so far (filled as chunks arrive)."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class ResponseMeta:
    """Fields every response and chunk of one request share."""

    id: str
    created: int
    model: str


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# -- logprobs ---------------------------------------------------------------------------------
def completion_logprobs(tokens: list[str], token_logprobs: list[float], start_offset: int = 0) -> dict[str, Any]:
    """Legacy completions `logprobs`: sampled tokens, their logprobs, and each token's character
    offset in the text (no top alternatives: the Triton model returns none)."""
    offsets, pos = [], start_offset
    for token in tokens:
        offsets.append(pos)
        pos += len(token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": None, "text_offset": offsets}


def chat_logprobs(tokens: list[str], token_logprobs: list[float]) -> dict[str, Any]:
    """Chat `logprobs.content`: one entry per sampled token, with its UTF-8 bytes."""
    return {
        "content": [
            {"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8")), "top_logprobs": []}
            for tok, lp in zip(tokens, token_logprobs, strict=True)
        ]
    }


# -- /v1/completions ----------------------------------------------------------------------------
def completion_response(
    meta: ResponseMeta, choices: list[ChoiceState], prompt_tokens: int, want_logprobs: bool
) -> dict[str, Any]:
    return {
        "id": meta.id,
        "object": "text_completion",
        "created": meta.created,
        "model": meta.model,
        "choices": [
            {
                "index": c.index,
                "text": c.text,
                "logprobs": completion_logprobs(c.tokens, c.token_logprobs) if want_logprobs else None,
                "finish_reason": c.finish_reason,
            }
            for c in choices
        ],
        "usage": usage(prompt_tokens, sum(c.num_output_tokens for c in choices)),
    }


def completion_chunk(
    meta: ResponseMeta,
    index: int,
    text: str,
    finish_reason: str | None,
    logprobs: dict[str, Any] | None,
    with_usage_field: bool,
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": meta.id,
        "object": "text_completion",
        "created": meta.created,
        "model": meta.model,
        "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
    }
    if with_usage_field:
        chunk["usage"] = None
    return chunk


def completion_usage_chunk(meta: ResponseMeta, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "id": meta.id,
        "object": "text_completion",
        "created": meta.created,
        "model": meta.model,
        "choices": [],
        "usage": usage(prompt_tokens, completion_tokens),
    }


# -- /v1/chat/completions -----------------------------------------------------------------------
def chat_response(
    meta: ResponseMeta, choices: list[ChoiceState], prompt_tokens: int, want_logprobs: bool
) -> dict[str, Any]:
    return {
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "choices": [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": chat_logprobs(c.tokens, c.token_logprobs) if want_logprobs else None,
                "finish_reason": c.finish_reason,
            }
            for c in choices
        ],
        "usage": usage(prompt_tokens, sum(c.num_output_tokens for c in choices)),
    }


def chat_chunk(
    meta: ResponseMeta,
    index: int,
    delta: dict[str, Any],
    finish_reason: str | None,
    logprobs: dict[str, Any] | None,
    with_usage_field: bool,
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": meta.id,
        "object": "chat.completion.chunk",
        "created": meta.created,
        "model": meta.model,
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
    }
    if with_usage_field:
        chunk["usage"] = None
    return chunk


def chat_usage_chunk(meta: ResponseMeta, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "id": meta.id,
        "object": "chat.completion.chunk",
        "created": meta.created,
        "model": meta.model,
        "choices": [],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def models_response(models: list[str], created: int, backend: str | None = None) -> dict[str, Any]:
    """OpenAI's model list; `backend` (kiln | vllm | hf, a Kiln extension field) when known."""
    extra = {"backend": backend} if backend else {}
    return {
        "object": "list",
        "data": [{"id": model, "object": "model", "created": created, "owned_by": "kiln", **extra}
                 for model in models],
    }


class ChunkEncoder:
    """SSE events of one stream's content chunks, rendered from a pre-encoded prefix.

    Equivalent to `sse_event(completion_chunk(...))` / `sse_event(chat_chunk(...))` without
    logprobs (the tests check that), but only the text is JSON-encoded per chunk: this runs once
    per streamed token of every request.
    """

    def __init__(self, meta: ResponseMeta, object_name: str, with_usage_field: bool) -> None:
        head = json.dumps(
            {"id": meta.id, "object": object_name, "created": meta.created, "model": meta.model},
            ensure_ascii=False, separators=(",", ":"),
        )
        self._prefix = "data: " + head[:-1] + ',"choices":[{"index":'
        self._suffix = "}]" + (',"usage":null' if with_usage_field else "") + "}\n\n"

    def completion(self, index: int, text: str, finish_reason: str | None) -> str:
        return (f'{self._prefix}{index},"text":{json.dumps(text, ensure_ascii=False)},"logprobs":null,'
                f'"finish_reason":{json.dumps(finish_reason)}{self._suffix}')

    def chat(self, index: int, content: str, finish_reason: str | None) -> str:
        delta = '{"content":' + json.dumps(content, ensure_ascii=False) + "}" if content else "{}"
        return (f'{self._prefix}{index},"delta":{delta},"logprobs":null,'
                f'"finish_reason":{json.dumps(finish_reason)}{self._suffix}')
