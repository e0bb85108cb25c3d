"""Sampling parameters do what they say, measured through the whole engine."""

from __future__ import annotations

import math

import pytest

from engine import LLM, InvalidRequestError, SamplingParams

PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def llm(tiny_engine):
    return LLM(tiny_engine("llama-gqa"), check_invariants=True)


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=1234, ignore_eos=True)
    alone = llm.generate([PROMPT], params)[0].token_ids
    batched = llm.generate(["hello", PROMPT, "world"], [SamplingParams(max_tokens=16), params,
                                                        SamplingParams(max_tokens=16)])[1].token_ids
    assert alone == batched
    other = llm.generate([PROMPT], SamplingParams(max_tokens=16, temperature=1.0, seed=99, ignore_eos=True))
    assert other[0].token_ids != alone


def test_top_k_one_equals_greedy(llm):
    greedy = llm.generate([PROMPT], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
    top1 = llm.generate([PROMPT], SamplingParams(max_tokens=16, temperature=1.5, top_k=1, ignore_eos=True))[0]
    assert top1.token_ids == greedy.token_ids


def test_stop_string_cuts_output_exactly(llm):
    full = llm.generate([PROMPT], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    assert len(full.text) > 8
    stop = full.text[5:8]
    cut = llm.generate([PROMPT], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert cut.stop_reason == stop
    assert cut.text == full.text[: full.text.index(stop)]
    kept = llm.generate([PROMPT], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop],
                                                 include_stop_str_in_output=True))[0]
    assert kept.text == full.text[: full.text.index(stop) + len(stop)]


def test_max_tokens_finishes_with_length(llm):
    out = llm.generate([PROMPT], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5


def test_stop_token_ids_and_min_tokens(llm):
    greedy = llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].token_ids
    out = llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                stop_token_ids=[greedy[3]]))[0]
    first = greedy.index(greedy[3])
    assert out.token_ids == greedy[: first + 1] and out.finish_reason == "stop" and out.stop_reason == greedy[3]
    # min_tokens forbids stopping on that token before 8 tokens.
    late = llm.generate([PROMPT], SamplingParams(max_tokens=12, min_tokens=8, temperature=0, ignore_eos=True,
                                                 stop_token_ids=[greedy[3]]))[0]
    assert len(late.token_ids) >= 8


def test_penalties_change_repetitive_output(llm):
    plain = llm.generate([PROMPT], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0].token_ids
    penalised = llm.generate([PROMPT], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                      repetition_penalty=2.0, frequency_penalty=2.0))[0].token_ids
    assert len(set(penalised)) > len(set(plain))


def test_bad_words_are_never_generated(llm):
    plain = llm.generate([PROMPT], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    # A generated token that is also how its text encodes on its own.
    token = next(t for t in plain.token_ids
                 if llm.tokenizer(llm.tokenizer.decode([t]), add_special_tokens=False).input_ids == [t])
    banned = llm.generate([PROMPT], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                                                   bad_words=[llm.tokenizer.decode([token])]))[0]
    assert token in plain.token_ids and token not in banned.token_ids


def test_logprobs_are_normalised_and_cumulative(llm):
    out = llm.generate([PROMPT], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3))[0]
    assert out.logprobs is not None and len(out.logprobs) == 6
    assert out.top_logprobs is not None
    for token, lp, top in zip(out.token_ids, out.logprobs, out.top_logprobs, strict=True):
        assert lp <= 0 and len(top) == 3
        assert math.isclose(max(top.values()), lp, abs_tol=1e-5)  # greedy picks the top token
        assert token in top
    assert math.isclose(out.cumulative_logprob, sum(out.logprobs), rel_tol=1e-6)


@pytest.mark.parametrize("kwargs", [
    {"max_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_k": -1}, {"min_tokens": 9, "max_tokens": 4},
    {"logprobs": 50}, {"stop": [""]},
])
def test_invalid_params_are_rejected(kwargs):
    with pytest.raises(InvalidRequestError):
        SamplingParams(**kwargs)


def test_invalid_prompts_are_rejected(llm):
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate([""], SamplingParams())
    with pytest.raises(InvalidRequestError, match="max_seq_len"):
        llm.generate([[5] * llm.config.build.max_seq_len], SamplingParams())
    with pytest.raises(InvalidRequestError, match="out of range"):
        llm.generate([[10**9]], SamplingParams())
    assert not llm.engine.has_unfinished_requests()
