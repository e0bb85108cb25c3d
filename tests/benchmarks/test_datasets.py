"""Prompts have exactly the token counts asked for, through the model's own tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.datasets import (
    SAMPLE_SHAREGPT,
    PromptMaker,
    load_tokenizer,
    prefix_requests,
    random_requests,
    sharegpt_requests,
)
from benchmarks.errors import BenchmarkError


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_tokenizer(tiny_checkpoint("llama-gqa"))


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_random_prompts_have_exact_lengths_within_the_range(tokenizer) -> None:
    requests = random_requests(tokenizer, num_prompts=40, input_len=100, output_len=20, range_ratio=0.5, seed=3)
    assert len(requests) == 40
    for r in requests:
        assert n_tokens(tokenizer, r.prompt) == r.prompt_len
        assert 50 <= r.prompt_len <= 150
        assert 10 <= r.expected_output_len <= 30
    assert len({r.prompt_len for r in requests}) > 5, "lengths should vary with range_ratio"
    assert len({r.prompt for r in requests}) == 40, "prompts should differ (no accidental prefix sharing)"


def test_random_prompts_are_reproducible_per_seed(tokenizer) -> None:
    a = random_requests(tokenizer, 5, 32, 8, seed=1)
    b = random_requests(tokenizer, 5, 32, 8, seed=1)
    c = random_requests(tokenizer, 5, 32, 8, seed=2)
    assert a == b
    assert a != c


@pytest.mark.parametrize("length", [1, 2, 3, 7, 64, 300])
def test_fallback_settling_also_gives_exact_lengths(tokenizer, length: int) -> None:
    # Force the decode/re-encode path used for tokenizers without single-token words.
    import numpy as np

    maker = PromptMaker(tokenizer, np.random.default_rng(length))
    maker.words = []
    for _ in range(10):
        assert n_tokens(tokenizer, maker.make(length)) == length


def test_prefix_dataset_shares_prefixes_with_exact_lengths(tokenizer) -> None:
    requests = prefix_requests(tokenizer, num_prompts=12, num_prefixes=3, prefix_len=48, suffix_len=16,
                               output_len=8, seed=0)
    for r in requests:
        assert r.prompt_len == 64 == n_tokens(tokenizer, r.prompt)
    # request i and i+3 share the same 48-token prefix, and no two prompts are equal
    for i in range(9):
        a = tokenizer(requests[i].prompt, add_special_tokens=False)["input_ids"]
        b = tokenizer(requests[i + 3].prompt, add_special_tokens=False)["input_ids"]
        assert a[:48] == b[:48]
    assert len({r.prompt for r in requests}) == 12


def test_bundled_sharegpt_sample_is_usable(tokenizer) -> None:
    raw = json.loads(SAMPLE_SHAREGPT.read_text())
    assert len(raw) >= 100
    requests = sharegpt_requests(SAMPLE_SHAREGPT, tokenizer, num_prompts=50, max_seq_len=2048, seed=0)
    assert len(requests) == 50
    for r in requests:
        assert r.prompt_len == n_tokens(tokenizer, r.prompt) >= 4
        assert r.expected_output_len >= 4
        assert r.prompt_len + r.expected_output_len <= 2048
    fixed = sharegpt_requests(SAMPLE_SHAREGPT, tokenizer, num_prompts=5, output_len=7, seed=0)
    assert {r.expected_output_len for r in fixed} == {7}


def test_sharegpt_respects_max_seq_len(tokenizer) -> None:
    requests = sharegpt_requests(SAMPLE_SHAREGPT, tokenizer, num_prompts=20, max_seq_len=200, seed=0)
    assert all(r.prompt_len + r.expected_output_len <= 200 for r in requests)


def test_bad_dataset_files_are_clear_errors(tokenizer, tmp_path: Path) -> None:
    with pytest.raises(BenchmarkError, match="no such file"):
        sharegpt_requests(tmp_path / "missing.json", tokenizer, 5)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(BenchmarkError, match="not valid JSON"):
        sharegpt_requests(broken, tokenizer, 5)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi"}]}]))
    with pytest.raises(BenchmarkError, match="no conversation with two turns"):
        sharegpt_requests(wrong, tokenizer, 5)
    with pytest.raises(BenchmarkError, match="--tokenizer"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(BenchmarkError, match="--input-len"):
        random_requests(tokenizer, 2, 0, 4)
