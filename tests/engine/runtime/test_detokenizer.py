"""Streamed text deltas concatenate to exactly the full decode, whatever the characters."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from engine import LLM, SamplingParams
from engine.runtime.detokenizer import IncrementalDetokenizer

TEXTS = [
    " leading space and   several   spaces",
    "日本語のテキストと中文文本混合。",
    "Emoji 🚀🔥 👍🏽 ✨ café naïve",
    "tabs\tand\nnew lines",
]


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_deltas_equal_full_decode(text, tiny_checkpoint):
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint("llama-gqa"))
    prompt = tok("Question:").input_ids
    ids = tok(text, add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tok, prompt)
    pieces = []
    for i, token in enumerate(ids):
        detok.add_token(token)
        pieces.append(detok.take_delta(finished=i == len(ids) - 1))
    assert "".join(pieces) == tok.decode(ids) == text


def test_stop_string_split_across_tokens_is_never_streamed(tiny_checkpoint):
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint("llama-gqa"))
    ids = tok("hello world the quick brown fox", add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tok, [], stop=("quick",))
    streamed = ""
    for token in ids:
        detok.add_token(token)
        streamed += detok.take_delta(finished=detok.stopped_by is not None)
        if detok.stopped_by:
            break
    assert streamed == "hello world the "
    assert detok.stopped_by == "quick"


def test_engine_stream_deltas_concatenate_to_text(tiny_engine):
    llm = LLM(tiny_engine("llama-gqa"))
    engine = llm.engine
    engine.add_request("r", "日本語 🚀", SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    deltas, final = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            deltas.append(out.delta_text)
            final = out
    assert final is not None and final.finished
    assert "".join(deltas) == final.text == llm.tokenizer.decode(final.token_ids, skip_special_tokens=True)
