"""Translation of OpenAI request bodies into the generations sent to Triton."""

from __future__ import annotations

import pytest

from serving.openai.errors import OpenAIError
from serving.openai.protocol import ChatCompletionRequest, CompletionRequest, build_generation


def test_defaults_follow_openai() -> None:
    gen = build_generation(CompletionRequest(model="m", prompt="hi"), "hi", 16, None)
    assert (gen.temperature, gen.top_p, gen.top_k, gen.seed, gen.stop) == (1.0, 1.0, 0, None, ())
    assert (gen.presence_penalty, gen.frequency_penalty, gen.repetition_penalty) == (0.0, 0.0, 1.0)


def test_every_sampling_field_is_carried() -> None:
    req = CompletionRequest(
        model="m", prompt="hi", temperature=0.5, top_p=0.9, top_k=7, seed=11, stop="END",
        presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.2, min_tokens=2, ignore_eos=True,
    )
    gen = build_generation(req, "hi", 8, 0)
    assert (gen.temperature, gen.top_p, gen.top_k, gen.seed, gen.stop) == (0.5, 0.9, 7, 11, ("END",))
    assert (gen.presence_penalty, gen.frequency_penalty, gen.repetition_penalty) == (0.5, -0.5, 1.2)
    assert (gen.min_tokens, gen.ignore_eos, gen.logprobs, gen.max_tokens) == (2, True, 0, 8)


def test_choices_of_a_seeded_request_get_consecutive_seeds() -> None:
    req = CompletionRequest(model="m", prompt="hi", n=3, seed=40)
    assert [build_generation(req, "hi", 4, None, i).seed for i in range(3)] == [40, 41, 42]


def test_engine_validation_applies_and_names_the_parameter() -> None:
    req = CompletionRequest(model="m", prompt="hi", min_tokens=9)
    with pytest.raises(OpenAIError) as info:
        build_generation(req, "hi", 4, None)
    assert info.value.status_code == 400 and info.value.param == "min_tokens"


def test_chat_content_parts_are_joined_and_images_refused() -> None:
    req = ChatCompletionRequest(
        model="m", messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    )
    assert req.template_messages() == [{"role": "user", "content": "ab"}]
    bad = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": [{"type": "image_url"}]}])
    with pytest.raises(OpenAIError) as info:
        bad.template_messages()
    assert info.value.param == "messages.0.content"


def test_max_completion_tokens_wins_and_must_agree() -> None:
    messages = [{"role": "user", "content": "x"}]
    assert ChatCompletionRequest(model="m", messages=messages, max_completion_tokens=5).requested_max_tokens() == 5
    assert ChatCompletionRequest(model="m", messages=messages, max_tokens=6).requested_max_tokens() == 6
    assert ChatCompletionRequest(model="m", messages=messages).requested_max_tokens() is None
