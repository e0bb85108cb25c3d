"""training/data.py: template split, exact label masking, line-numbered data errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from training.data import IGNORE_INDEX, PromptTemplate, collate, encode_example, load_dataset
from training.errors import DataError

TEMPLATE = "Question: {question} Answer: {answer}"


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return AutoTokenizer.from_pretrained(tiny_checkpoint("llama-gqa"))


def test_template_splits_at_the_last_field_by_default():
    t = PromptTemplate.parse("Q: {question} Ctx: {context} A: {answer}.")
    assert t.fields == ("question", "context", "answer")
    assert t.answer_field == "answer"
    record = {"question": "why", "context": "none", "answer": "because"}
    assert t.render_prompt(record) == "Q: why Ctx: none A: "
    assert t.render_completion(record) == "because."


def test_answer_field_flag_moves_the_split_and_escaped_braces_survive():
    t = PromptTemplate.parse("{{json}} {answer} is the answer to {question}", answer_field="answer")
    record = {"question": "q", "answer": "a"}
    assert t.render_prompt(record) == "{json} "
    assert t.render_completion(record) == "a is the answer to q"


@pytest.mark.parametrize(
    ("template", "answer_field", "message"),
    [
        ("no fields here", None, "has no {field} placeholder"),
        ("Q: {} A: {answer}", None, "plain field name"),
        ("Q: {q!r} A: {a}", None, "format spec or conversion"),
        ("Q: {q} A: {a}", "answer", "{answer} must appear exactly once"),
        ("Q: {q} A: {a} again {a}", None, "{a} must appear exactly once"),
        ("Q: {q A: {a}", None, "literal brace"),
        ("<|VIRTUAL_PROMPT_0|> Q: {q} A: {a}", None, "need --method prompt-tuning"),
    ],
)
def test_bad_templates_are_rejected_with_the_reason(template, answer_field, message):
    with pytest.raises(DataError, match=message.replace("{", r"\{").replace("}", r"\}").replace("|", r"\|")):
        PromptTemplate.parse(template, answer_field)


def test_leading_virtual_marker_is_dropped_for_prompt_methods_only_at_the_start():
    t = PromptTemplate.parse("<|VIRTUAL_PROMPT_0|> Q: {q} A: {a}", allow_virtual_marker=True)
    assert t.has_virtual_marker and t.prompt_part == "Q: {q} A: "
    with pytest.raises(DataError, match="may only open the template"):
        PromptTemplate.parse("Q: {q} <|VIRTUAL_PROMPT_0|> A: {a}", allow_virtual_marker=True)


def test_answer_only_loss_masks_exactly_the_prompt_tokens(tokenizer):
    template = PromptTemplate.parse(TEMPLATE)
    record = {"question": "what is ML?", "answer": "machine learning"}
    example = encode_example(tokenizer, template, record, answer_only_loss=True)

    prompt_ids = tokenizer("Question: what is ML? Answer: ")["input_ids"]
    answer_ids = tokenizer("machine learning", add_special_tokens=False)["input_ids"]
    assert list(example.input_ids) == prompt_ids + answer_ids + [tokenizer.eos_token_id]
    assert list(example.labels) == [IGNORE_INDEX] * len(prompt_ids) + answer_ids + [tokenizer.eos_token_id]

    short = encode_example(tokenizer, template, {"question": "hi", "answer": "yes"}, answer_only_loss=True)
    batch = collate([example, short], tokenizer.pad_token_id)
    labels = batch["labels"]  # (2, T)
    n_short = len(short.input_ids)
    assert labels.shape == (2, len(example.input_ids))
    assert torch.equal(labels[0], torch.tensor(example.labels))
    # Padding is masked in the labels and the attention mask alike.
    assert (labels[1, n_short:] == IGNORE_INDEX).all()
    assert batch["attention_mask"][1].tolist() == [1] * n_short + [0] * (labels.shape[1] - n_short)
    assert (batch["input_ids"][1, n_short:] == tokenizer.pad_token_id).all()


def test_without_answer_only_loss_every_real_token_is_a_label(tokenizer):
    template = PromptTemplate.parse(TEMPLATE)
    example = encode_example(tokenizer, template, {"question": "q", "answer": "a"}, answer_only_loss=False)
    assert example.labels == example.input_ids


def _write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


MALFORMED = [
    '{"question": "one", "answer": "two"}',  # 1 ok
    '{"question": "three", "answer": ',  # 2 invalid JSON
    "",  # 3 blank: ignored
    '{"question": "four"}',  # 4 missing answer
    '["not", "an", "object"]',  # 5
    '{"question": "' + "long " * 200 + '", "answer": "x"}',  # 6 too long
    '{"question": {"nested": 1}, "answer": "x"}',  # 7 wrong type
    '{"question": 5, "answer": 6}',  # 8 ok: numbers are fine
]


def test_malformed_records_are_skipped_with_their_line_numbers(tokenizer, tmp_path):
    template = PromptTemplate.parse(TEMPLATE)
    dataset = load_dataset(_write(tmp_path, MALFORMED), tokenizer, template, max_seq_len=64)
    assert [e.line for e in dataset.examples] == [1, 8]
    reasons = {s.line: s.reason for s in dataset.skipped}
    assert sorted(reasons) == [2, 4, 5, 6, 7]
    assert reasons[2].startswith("invalid JSON")
    assert reasons[4] == "missing field(s) answer"
    assert reasons[5] == "expected a JSON object, got list"
    assert "more than the 64 allowed by --max-seq-len" in reasons[6]
    assert "field 'question' must be a string or a number" in reasons[7]


def test_strict_mode_fails_naming_every_bad_line(tokenizer, tmp_path):
    template = PromptTemplate.parse(TEMPLATE)
    with pytest.raises(DataError) as err:
        load_dataset(_write(tmp_path, MALFORMED), tokenizer, template, max_seq_len=64, strict=True)
    message = str(err.value)
    assert "5 bad record(s)" in message
    for line in (2, 4, 5, 6, 7):
        assert f"line {line}:" in message
    assert "line 1:" not in message and "line 8:" not in message


def test_virtual_tokens_count_against_the_length_budget(tokenizer, tmp_path):
    template = PromptTemplate.parse(TEMPLATE)
    path = _write(tmp_path, ['{"question": "q", "answer": "a"}', '{"question": "a b c d e f g", "answer": "a"}'])
    n_first = len(encode_example(tokenizer, template, {"question": "q", "answer": "a"}).input_ids)
    dataset = load_dataset(path, tokenizer, template, max_seq_len=n_first + 4, num_reserved_tokens=4)
    assert [e.line for e in dataset.examples] == [1]
    assert "minus 4 virtual tokens" in dataset.skipped[0].reason


def test_a_file_without_usable_records_is_an_error(tokenizer, tmp_path):
    template = PromptTemplate.parse(TEMPLATE)
    with pytest.raises(DataError, match=r"no usable records: line 1: missing field\(s\) answer"):
        load_dataset(_write(tmp_path, ['{"question": "q"}']), tokenizer, template, max_seq_len=64)
