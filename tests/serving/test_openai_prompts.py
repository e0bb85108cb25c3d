"""Chat templating and context-length fitting in the gateway."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from serving.openai.errors import OpenAIError
from serving.openai.prompts import PromptProcessor

MAX_SEQ_LEN = 32


@pytest.fixture(scope="module")
def prompts(tiny_checkpoint: Callable[..., Path]) -> PromptProcessor:
    return PromptProcessor.from_dir(tiny_checkpoint("llama-gqa"), MAX_SEQ_LEN)


def test_chat_prompt_is_the_chatml_template_with_generation_prompt(prompts: PromptProcessor) -> None:
    text = prompts.render_chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert text == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_prompt_of_max_seq_len_minus_one_fits_with_one_token_of_room(prompts: PromptProcessor) -> None:
    assert prompts.fit_max_tokens(MAX_SEQ_LEN - 1, None, None) == 1
    assert prompts.fit_max_tokens(MAX_SEQ_LEN - 1, 1, 16) == 1


def test_prompt_of_max_seq_len_is_refused_naming_the_limit(prompts: PromptProcessor) -> None:
    with pytest.raises(OpenAIError) as info:
        prompts.fit_max_tokens(MAX_SEQ_LEN, None, None)
    assert info.value.status_code == 400 and f"{MAX_SEQ_LEN} tokens" in info.value.message


def test_requested_max_tokens_must_fit_the_rest_of_the_context(prompts: PromptProcessor) -> None:
    assert prompts.fit_max_tokens(10, MAX_SEQ_LEN - 10, None) == MAX_SEQ_LEN - 10
    with pytest.raises(OpenAIError) as info:
        prompts.fit_max_tokens(10, MAX_SEQ_LEN - 9, None)
    assert info.value.param == "max_tokens" and f"at most {MAX_SEQ_LEN - 10}" in info.value.message


def test_default_max_tokens_is_capped_by_the_room_left(prompts: PromptProcessor) -> None:
    assert prompts.fit_max_tokens(5, None, 16) == 16
    assert prompts.fit_max_tokens(MAX_SEQ_LEN - 4, None, 16) == 4
    assert prompts.fit_max_tokens(5, None, None) == MAX_SEQ_LEN - 5  # chat: the rest of the context


def test_token_count_matches_the_tokenizer(prompts: PromptProcessor) -> None:
    text = "hello world 日本語"
    assert prompts.count_tokens(text) == len(prompts.tokenizer(text).input_ids) > 0
