"""jsonl records -> token ids and labels for supervised fine-tuning.

A template such as ``"Question: {question} Answer: {answer}"`` splits in two at the answer
field: the *prompt* (the template up to ``{answer}``, verbatim) and the *completion* (from
``{answer}`` to the end). Each half is tokenized on its own and the ids concatenated, so that a
served request carrying exactly the rendered prompt is tokenized exactly as in training:

    input_ids = tokenize(prompt, special tokens) + tokenize(completion, no special tokens) + [eos]
    labels    = [-100] * len(prompt ids)          + completion ids                          + [eos]

(with `answer_only_loss=False`, labels equal input_ids). Padding is always labelled -100.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from training.errors import DataError

IGNORE_INDEX = -100
# DESIGN §6 templates may start with virtual-token markers; PEFT always puts the virtual tokens
# in front of everything, so a marker is only meaningful at the very start.
VIRTUAL_MARKER = re.compile(r"<\|VIRTUAL_PROMPT_\d+\|>")
_LEADING_MARKERS = re.compile(r"^(?:\s*<\|VIRTUAL_PROMPT_\d+\|>)+\s*")


@dataclass(frozen=True)
class PromptTemplate:
    """A parsed template: `prompt_part` + `completion_part` == the template without markers."""

    text: str
    fields: tuple[str, ...]
    answer_field: str
    prompt_part: str
    completion_part: str
    has_virtual_marker: bool = False

    @classmethod
    def parse(cls, text: str, answer_field: str | None = None, allow_virtual_marker: bool = False) -> PromptTemplate:
        """Validate a template; errors name the offending placeholder or flag."""
        body = text
        has_marker = bool(_LEADING_MARKERS.match(body))
        if has_marker:
            if not allow_virtual_marker:
                raise DataError("--template: <|VIRTUAL_PROMPT_n|> markers need --method prompt-tuning or p-tuning")
            body = _LEADING_MARKERS.sub("", body, count=1)
        if VIRTUAL_MARKER.search(body):
            raise DataError(
                "--template: <|VIRTUAL_PROMPT_n|> markers may only open the template "
                "(the virtual tokens are placed in front of everything)"
            )
        fields: list[str] = []
        try:
            parsed = list(string.Formatter().parse(body))
        except ValueError as exc:
            raise DataError(f"--template {text!r}: {exc} (write a literal brace as {{{{ or }}}})") from None
        for _, name, spec, conversion in parsed:
            if name is None:
                continue
            if not name.isidentifier():
                raise DataError(f"--template: placeholder {{{name}}} must be a plain field name like {{question}}")
            if spec or conversion:
                raise DataError(f"--template: placeholder {{{name}}} may not carry a format spec or conversion")
            fields.append(name)
        if not fields:
            raise DataError(f"--template {text!r} has no {{field}} placeholder")
        answer = answer_field if answer_field is not None else fields[-1]
        if fields.count(answer) != 1:
            where = "--answer-field" if answer_field is not None else "--template"
            raise DataError(
                f"{where}: the answer field {{{answer}}} must appear exactly once in the template, "
                f"found {fields.count(answer)} times (fields: {', '.join(fields)})"
            )
        cut = _placeholder_offset(body, answer)
        return cls(
            text=text,
            fields=tuple(dict.fromkeys(fields)),
            answer_field=answer,
            prompt_part=body[:cut],
            completion_part=body[cut:],
            has_virtual_marker=has_marker,
        )

    def render_prompt(self, record: Mapping[str, Any]) -> str:
        """The text a served request should carry to ask for this record's answer."""
        return self.prompt_part.format_map(_StrFields(record))

    def render_completion(self, record: Mapping[str, Any]) -> str:
        return self.completion_part.format_map(_StrFields(record))


def _placeholder_offset(body: str, name: str) -> int:
    """Character offset of `{name}` in the raw template, skipping escaped braces."""
    pos = 0
    for literal, field_name, _, _ in string.Formatter().parse(body):
        # Escaped braces appear once in `literal` but twice in `body`.
        pos += len(literal) + literal.count("{") + literal.count("}")
        if field_name == name:
            return pos
        if field_name is not None:
            pos += len(field_name) + 2
    raise AssertionError(f"placeholder {name} vanished")  # parse() found it just before


class _StrFields(dict[str, Any]):
    def __init__(self, record: Mapping[str, Any]):
        super().__init__({k: _field_text(k, v) for k, v in record.items()})


def _field_text(name: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise TypeError(f"field {name!r} must be a string or a number, got {type(value).__name__}")


@dataclass(frozen=True)
class Example:
    """One tokenized record. `input_ids` and `labels` have the same length."""

    line: int
    prompt: str
    completion: str
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def num_label_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


@dataclass(frozen=True)
class SkippedRecord:
    line: int
    reason: str


@dataclass(frozen=True)
class Dataset:
    path: Path
    examples: tuple[Example, ...]
    skipped: tuple[SkippedRecord, ...] = field(default=())

    def __len__(self) -> int:
        return len(self.examples)


def encode_example(
    tokenizer: Any, template: PromptTemplate, record: Mapping[str, Any], answer_only_loss: bool = True, line: int = 0
) -> Example:
    """Tokenize one record (see the module docstring for the exact layout)."""
    prompt = template.render_prompt(record)
    completion = template.render_completion(record)
    prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        completion_ids.append(tokenizer.eos_token_id)
    input_ids = prompt_ids + completion_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids if answer_only_loss else list(input_ids)
    return Example(line, prompt, completion, tuple(input_ids), tuple(labels))


def load_dataset(
    path: Path,
    tokenizer: Any,
    template: PromptTemplate,
    max_seq_len: int,
    answer_only_loss: bool = True,
    strict: bool = False,
    num_reserved_tokens: int = 0,
    flag: str = "--data",
) -> Dataset:
    """Read a jsonl file; bad records are skipped and listed with their line numbers.

    A record is bad when its line is not a JSON object, misses a template field, holds a field
    that is not a string/number, or needs more than `max_seq_len - num_reserved_tokens` tokens.
    With `strict`, any bad record raises DataError naming all of them. Blank lines are ignored.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{flag} {path}: cannot read: {exc}") from None
    budget = max_seq_len - num_reserved_tokens
    examples: list[Example] = []
    skipped: list[SkippedRecord] = []
    for line_no, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        reason = None
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            reason = f"invalid JSON ({exc.msg} at column {exc.colno})"
        else:
            if not isinstance(record, dict):
                reason = f"expected a JSON object, got {type(record).__name__}"
            elif missing := [f for f in template.fields if f not in record]:
                reason = f"missing field(s) {', '.join(missing)}"
            else:
                try:
                    example = encode_example(tokenizer, template, record, answer_only_loss, line_no)
                except TypeError as exc:
                    reason = str(exc)
                else:
                    if len(example.input_ids) > budget:
                        reason = f"{len(example.input_ids)} tokens, more than the {budget} allowed by --max-seq-len"
                        if num_reserved_tokens:
                            reason += f" minus {num_reserved_tokens} virtual tokens"
                    elif example.num_label_tokens == 0:
                        reason = "no answer tokens to learn from"
                    else:
                        examples.append(example)
        if reason is not None:
            skipped.append(SkippedRecord(line_no, reason))
    if strict and skipped:
        raise DataError(f"{flag} {path}: {len(skipped)} bad record(s): {format_skipped(skipped)}")
    if not examples:
        detail = f": {format_skipped(skipped)}" if skipped else ""
        raise DataError(f"{flag} {path}: no usable records{detail}")
    return Dataset(path, tuple(examples), tuple(skipped))


def format_skipped(skipped: Sequence[SkippedRecord], limit: int = 5) -> str:
    shown = "; ".join(f"line {s.line}: {s.reason}" for s in skipped[:limit])
    more = len(skipped) - limit
    return shown + (f"; and {more} more" if more > 0 else "")


def collate(examples: Sequence[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch. Returns input_ids, attention_mask, labels, each (B, T) int64."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
