"""The TensorRT-LLM-style request tensors -> prompt + SamplingParams translation."""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import InvalidRequestError
from serving.triton.request import INPUTS, OUTPUTS, check_length, parse_request

VOCAB = 384


def text(value: str | bytes) -> np.ndarray:
    raw = value.encode() if isinstance(value, str) else value
    return np.array([[raw]], dtype=np.object_)


def scalar(value: object, dtype: type) -> np.ndarray:
    return np.array([[value]], dtype=dtype)


def test_minimal_request_is_greedy_with_default_max_tokens() -> None:
    req = parse_request({"text_input": text("What is ML?")}, VOCAB, default_max_tokens=7)
    assert (req.prompt, req.params.max_tokens, req.params.temperature) == ("What is ML?", 7, 0.0)
    assert (req.stream, req.exclude_input_in_output, req.return_log_probs) == (False, False, False)


def test_every_sampling_input_reaches_sampling_params() -> None:
    req = parse_request(
        {
            "text_input": text("hi"),
            "max_tokens": scalar(20, np.int32),
            "stream": scalar(True, np.bool_),
            "exclude_input_in_output": scalar(True, np.bool_),
            "temperature": scalar(0.7, np.float32),
            "top_k": scalar(5, np.int32),
            "top_p": scalar(0.9, np.float32),
            "seed": scalar(42, np.uint64),
            "stop_words": np.array([[b"foo", b"", b"bar"]], dtype=np.object_),
            "bad_words": np.array([[b"baz"]], dtype=np.object_),
            "min_tokens": scalar(3, np.int32),
            "repetition_penalty": scalar(1.1, np.float32),
            "presence_penalty": scalar(0.5, np.float32),
            "frequency_penalty": scalar(-0.5, np.float32),
            "return_log_probs": scalar(True, np.bool_),
        },
        VOCAB,
    )
    p = req.params
    assert (p.max_tokens, p.min_tokens, p.top_k, p.seed) == (20, 3, 5, 42)
    assert p.temperature == pytest.approx(0.7) and p.top_p == pytest.approx(0.9)
    assert p.repetition_penalty == pytest.approx(1.1)
    assert (p.presence_penalty, p.frequency_penalty) == (0.5, -0.5)
    assert p.stop == ("foo", "bar") and p.bad_words == ("baz",)  # empty words are skipped
    assert p.logprobs == 0 and req.return_log_probs and req.stream and req.exclude_input_in_output


def test_top_k_alone_samples_and_top_p_zero_disables_top_p() -> None:
    req = parse_request({"text_input": text("x"), "top_k": scalar(10, np.int32), "top_p": scalar(0.0, np.float32)},
                        VOCAB)
    assert (req.params.temperature, req.params.top_k, req.params.top_p) == (1.0, 10, 1.0)


def test_random_seed_is_an_alias_of_seed() -> None:
    req = parse_request({"text_input": text("x"), "random_seed": scalar(9, np.uint64)}, VOCAB)
    assert req.params.seed == 9
    with pytest.raises(InvalidRequestError, match="disagree"):
        parse_request({"text_input": text("x"), "random_seed": scalar(9, np.uint64),
                       "seed": scalar(8, np.uint64)}, VOCAB)


def test_end_id_replaces_eos_and_negative_end_id_ignores_it() -> None:
    req = parse_request({"text_input": text("x"), "end_id": scalar(5, np.int32)}, VOCAB)
    assert req.params.stop_token_ids == (5,) and req.params.ignore_eos
    req = parse_request({"text_input": text("x"), "end_id": scalar(-1, np.int32)}, VOCAB)
    assert req.params.stop_token_ids == () and req.params.ignore_eos


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({}, "'text_input' is required"),
        ({"text_input": text("")}, "'text_input' is empty"),
        ({"text_input": text(b"\xff\xfeabc")}, "not valid UTF-8: byte 0xff at position 0"),
        ({"text_input": np.array([[1]], dtype=np.int32)}, "'text_input' must be BYTES"),
        ({"text_input": text("x"), "max_tokens": scalar(0, np.int32)}, "'max_tokens' must be >= 1, got 0"),
        ({"text_input": text("x"), "max_tokens": scalar(-3, np.int32)}, "'max_tokens' must be >= 1, got -3"),
        ({"text_input": text("x"), "max_tokens": scalar(2.5, np.float32)}, "'max_tokens' must be INT32"),
        ({"text_input": text("x"), "temperature": scalar(-1.0, np.float32)}, "temperature must be >= 0"),
        ({"text_input": text("x"), "top_p": scalar(1.5, np.float32)}, "top_p must be in"),
        ({"text_input": text("x"), "beam_width": scalar(4, np.int32)}, "no beam search"),
        ({"text_input": text("x"), "end_id": scalar(VOCAB, np.int32)}, "not a token id"),
        ({"text_input": np.array([[b"a"], [b"b"]], dtype=np.object_)}, "batch size 2; send one prompt"),
        ({"text_input": text("x"), "prompt": text("y")}, "unknown input"),
        ({"text_input": text("x"), "temperature": scalar(np.nan, np.float32)}, "finite"),
    ],
)
def test_bad_requests_name_what_is_wrong(inputs: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        parse_request(inputs, VOCAB)


def test_check_length_refuses_prompts_and_budgets_beyond_max_seq_len() -> None:
    check_length(10, 22, 32)
    with pytest.raises(InvalidRequestError, match="send at most 31 prompt tokens"):
        check_length(32, 1, 32)
    with pytest.raises(InvalidRequestError, match="send max_tokens <= 22"):
        check_length(10, 23, 32)


def test_tensor_names_are_tensorrt_llm_backend_names() -> None:
    names = {spec.name for spec in INPUTS}
    assert {"text_input", "max_tokens", "stream", "temperature", "top_k", "top_p", "seed", "random_seed",
            "stop_words", "bad_words", "end_id", "pad_id", "min_tokens", "repetition_penalty",
            "presence_penalty", "frequency_penalty", "return_log_probs", "exclude_input_in_output"} <= names
    assert [s.name for s in INPUTS if not s.optional] == ["text_input"]
    assert {"text_output", "output_log_probs", "cum_log_probs"} <= {spec.name for spec in OUTPUTS}
