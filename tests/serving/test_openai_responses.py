"""Response and stream-chunk shapes."""

from __future__ import annotations

import json

import pytest

from serving.openai import responses as R
from serving.openai.sse import sse_event

META = R.ResponseMeta(id='cmpl-"x"', created=1700000000, model="ens\\emble")


@pytest.mark.parametrize("text", ["", "plain", 'quotes " and \\ backslash', "new\nline\t", "日本 🚀 é"])
@pytest.mark.parametrize("finish_reason", [None, "stop", "length"])
@pytest.mark.parametrize("with_usage", [False, True])
def test_chunk_encoder_equals_the_dict_builders(text: str, finish_reason: str | None, with_usage: bool) -> None:
    completion = R.ChunkEncoder(META, "text_completion", with_usage)
    assert completion.completion(3, text, finish_reason) == sse_event(
        R.completion_chunk(META, 3, text, finish_reason, None, with_usage))
    chat = R.ChunkEncoder(META, "chat.completion.chunk", with_usage)
    delta = {"content": text} if text else {}
    assert json.loads(chat.chat(1, text, finish_reason)[len("data: "):]) == json.loads(
        sse_event(R.chat_chunk(META, 1, delta, finish_reason, None, with_usage))[len("data: "):])


def test_usage_totals_and_prompt_counted_once_per_choice_set() -> None:
    states = [R.ChoiceState(0, "a", "stop", 5, 2), R.ChoiceState(1, "b", "length", 5, 4)]
    body = R.completion_response(META, states, prompt_tokens=5, want_logprobs=False)
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}
    assert [c["finish_reason"] for c in body["choices"]] == ["stop", "length"]


def test_completion_logprobs_offsets_follow_token_text() -> None:
    lp = R.completion_logprobs(["He", "llo", " 日"], [-0.1, -0.2, -0.3])
    assert lp["text_offset"] == [0, 2, 5] and lp["top_logprobs"] is None
