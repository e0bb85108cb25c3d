"""Server-sent events framing for OpenAI streaming: one `data: <json>` event per chunk, a blank
line after each, and the literal `data: [DONE]` event at the end of every stream (including one
that ends in an error event)."""

from __future__ import annotations

import json
from typing import Any

SSE_DONE = "data: [DONE]\n\n"
SSE_MEDIA_TYPE = "text/event-stream"


def sse_event(payload: dict[str, Any]) -> str:
    """One SSE event holding `payload` as compact JSON (non-ASCII kept as UTF-8, not escaped)."""
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def parse_sse(body: str) -> list[str]:
    """The `data:` payloads of an SSE body, in order (for clients and tests; `[DONE]` included)."""
    events = []
    for block in body.split("\n\n"):
        lines = [line[len("data:"):].lstrip(" ") for line in block.split("\n") if line.startswith("data:")]
        if lines:
            events.append("\n".join(lines))
    return events
