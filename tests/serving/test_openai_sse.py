"""SSE framing of the gateway's streams."""

from __future__ import annotations

import json

from serving.openai.sse import SSE_DONE, parse_sse, sse_event


def test_event_is_one_data_line_and_blank_line_with_utf8_kept() -> None:
    event = sse_event({"text": "日本 🚀", "n": 1})
    assert event.startswith("data: ") and event.endswith("\n\n")
    assert event.count("\n") == 2
    assert "日本 🚀" in event  # not \u-escaped: clients see the characters


def test_parse_round_trips_events_and_done() -> None:
    payloads = [{"i": i, "text": t} for i, t in enumerate(["a", "\n", "é✨"])]
    body = "".join(sse_event(p) for p in payloads) + SSE_DONE
    events = parse_sse(body)
    assert events[-1] == "[DONE]"
    assert [json.loads(e) for e in events[:-1]] == payloads
