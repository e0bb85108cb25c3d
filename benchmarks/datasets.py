"""Benchmark prompts with exact token counts through the model's own tokenizer.

- `random`: prompts of exactly N tokens (lengths drawn from [N(1−r), N(1+r)] with
  `range_ratio` r), expected output M tokens likewise.
- `sharegpt`: the first human turn of each ShareGPT conversation as the prompt, the length of
  the first model reply as the expected output (vLLM's sampling and filters).
- `prefix`: G shared system prompts of P tokens, each request one of them plus a unique
  suffix of S tokens — the workload prefix caching is for.

Token counts never include special tokens the tokenizer would add (BOS): a prompt of
`prompt_len` tokens is `len(tokenizer(prompt, add_special_tokens=False).input_ids)`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.errors import BenchmarkError

DATASETS = ("random", "sharegpt", "prefix")
SAMPLE_SHAREGPT = Path(__file__).parent / "data" / "sharegpt_sample.json"
_WORD = re.compile(r"^ [A-Za-z]{2,}$")


@dataclass(frozen=True)
class SampleRequest:
    """One prompt to send and how many tokens the answer should have."""

    prompt: str
    prompt_len: int
    expected_output_len: int


def load_tokenizer(path: str | Path) -> Any:
    """`transformers.AutoTokenizer` from an engine or checkpoint directory, with a clear error."""
    from transformers import AutoTokenizer

    directory = Path(path)
    if not directory.is_dir():
        raise BenchmarkError(f"--tokenizer {path}: not a directory (pass an engine or checkpoint directory)")
    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BenchmarkError(f"--tokenizer {path}: cannot load a tokenizer ({first_line})") from None


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class PromptMaker:
    """Makes text that re-encodes to exactly the requested number of tokens.

    Byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM2, Qwen) pre-split text into words with
    their leading space, and BPE never merges across pre-split pieces, so a text made of
    " word" pieces that are single tokens on their own has exactly one token per piece. For
    tokenizers where no such pieces exist (SentencePiece), random ids are decoded and
    re-encoded until the length settles, as vLLM does. The result is always verified.
    """

    def __init__(self, tokenizer: Any, rng: np.random.Generator) -> None:
        self.tokenizer = tokenizer
        self.rng = rng
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        ids = [i for i in range(len(tokenizer)) if i not in special]
        texts = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=True)
        # Only ids that decode to clean text and re-encode to themselves: a lone byte of a
        # multi-byte character would decode to U+FFFD and never settle.
        clean = [(i, t) for i, t in zip(ids, texts, strict=True) if t and "\ufffd" not in t]
        encoded = tokenizer([t for _, t in clean], add_special_tokens=False)["input_ids"] if clean else []
        round_trip = [(i, t) for (i, t), again in zip(clean, encoded, strict=True) if list(again) == [i]]
        if not round_trip:
            raise BenchmarkError("this tokenizer has no token that decodes and re-encodes to itself")
        self.vocab_ids = np.array([i for i, _ in round_trip], dtype=np.int64)
        words = sorted({t for _, t in round_trip if _WORD.match(t)})
        # A handful of words would make every prompt the same few tokens; settle ids instead.
        self.words = words if len(words) >= 8 else []

    def make(self, num_tokens: int) -> str:
        """A text of exactly `num_tokens` tokens (no special tokens)."""
        if num_tokens < 1:
            raise BenchmarkError(f"prompt length must be >= 1 token, got {num_tokens}")
        if self.words:
            picks = self.rng.integers(0, len(self.words), size=num_tokens)
            text = "".join(self.words[i] for i in picks)
            if len(_encode(self.tokenizer, text)) == num_tokens:
                return text
        return self._settle(num_tokens)

    def _settle(self, num_tokens: int, attempts: int = 10, max_rounds: int = 20) -> str:
        for _ in range(attempts):
            ids = [int(i) for i in self.rng.choice(self.vocab_ids, size=num_tokens)]
            for _ in range(max_rounds):
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                again = _encode(self.tokenizer, text)
                if len(again) == num_tokens:
                    return text
                if len(again) > num_tokens:
                    ids = again[:num_tokens]
                else:
                    extra = self.rng.choice(self.vocab_ids, size=num_tokens - len(again))
                    ids = again + [int(i) for i in extra]
        raise BenchmarkError(
            f"could not make a prompt of exactly {num_tokens} tokens with this tokenizer; "
            "try another --seed or length"
        )


def _lengths(rng: np.random.Generator, mean: int, range_ratio: float, count: int, flag: str) -> list[int]:
    if mean < 1:
        raise BenchmarkError(f"{flag} must be >= 1, got {mean}")
    if not 0.0 <= range_ratio < 1.0:
        raise BenchmarkError(f"--range-ratio must be in [0, 1), got {range_ratio}")
    low = max(1, int(round(mean * (1 - range_ratio))))
    high = max(low, int(round(mean * (1 + range_ratio))))
    return [int(x) for x in rng.integers(low, high + 1, size=count)]


def random_requests(
    tokenizer: Any, num_prompts: int, input_len: int, output_len: int, range_ratio: float = 0.0, seed: int = 0
) -> list[SampleRequest]:
    """`num_prompts` random prompts of exact token lengths (see module docstring)."""
    rng = np.random.default_rng(seed)
    maker = PromptMaker(tokenizer, rng)
    in_lens = _lengths(rng, input_len, range_ratio, num_prompts, "--input-len")
    out_lens = _lengths(rng, output_len, range_ratio, num_prompts, "--output-len")
    return [SampleRequest(maker.make(n), n, m) for n, m in zip(in_lens, out_lens, strict=True)]


def prefix_requests(
    tokenizer: Any,
    num_prompts: int,
    num_prefixes: int,
    prefix_len: int,
    suffix_len: int,
    output_len: int,
    seed: int = 0,
) -> list[SampleRequest]:
    """Request i = shared prefix (i mod `num_prefixes`) + its own suffix; lengths exact."""
    if num_prefixes < 1:
        raise BenchmarkError(f"--num-prefixes must be >= 1, got {num_prefixes}")
    if output_len < 1:
        raise BenchmarkError(f"--output-len must be >= 1, got {output_len}")
    rng = np.random.default_rng(seed)
    maker = PromptMaker(tokenizer, rng)
    prefixes = [maker.make(prefix_len) for _ in range(num_prefixes)]
    requests = []
    for i in range(num_prompts):
        prefix = prefixes[i % num_prefixes]
        for _ in range(20):  # a suffix whose first piece merges into the prefix is redrawn
            prompt = prefix + maker.make(suffix_len)
            if len(_encode(tokenizer, prompt)) == prefix_len + suffix_len:
                break
        else:
            raise BenchmarkError("could not join prefix and suffix at an exact token count; try another --seed")
        requests.append(SampleRequest(prompt, prefix_len + suffix_len, output_len))
    return requests


def sharegpt_requests(
    path: str | Path,
    tokenizer: Any,
    num_prompts: int,
    output_len: int | None = None,
    max_seq_len: int = 2048,
    seed: int = 0,
) -> list[SampleRequest]:
    """Sample ShareGPT conversations as vLLM does: shuffle (seeded), keep the first
    human/model exchange, drop prompts or answers under 4 tokens, prompts over 1024 tokens and
    pairs over `max_seq_len`. `output_len` fixes every expected output length. When the file
    has fewer usable conversations than `num_prompts`, they are reused in order."""
    file = Path(path)
    try:
        raw = json.loads(file.read_text())
    except FileNotFoundError:
        raise BenchmarkError(f"--dataset-path {file}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BenchmarkError(f"--dataset-path {file}: not valid JSON ({exc})") from None
    if not isinstance(raw, list):
        raise BenchmarkError(f"--dataset-path {file}: expected a JSON list of conversations (ShareGPT format)")

    pairs: list[tuple[str, str]] = []
    for item in raw:
        turns = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        first, second = turns[0], turns[1]
        if not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in (first, second)):
            continue
        pairs.append((first["value"], second["value"]))
    if not pairs:
        raise BenchmarkError(
            f"--dataset-path {file}: no conversation with two turns "
            '(expected [{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]}, ...])'
        )
    order = np.random.default_rng(seed).permutation(len(pairs))

    kept: list[SampleRequest] = []
    for i in order:
        prompt, answer = pairs[int(i)]
        prompt_len = len(_encode(tokenizer, prompt))
        answer_len = len(_encode(tokenizer, answer)) if output_len is None else output_len
        if prompt_len < 4 or (output_len is None and answer_len < 4):
            continue
        if prompt_len > 1024 or prompt_len + answer_len > max_seq_len:
            continue
        kept.append(SampleRequest(prompt, prompt_len, answer_len))
        if len(kept) == num_prompts:
            break
    if not kept:
        raise BenchmarkError(f"--dataset-path {file}: every conversation was filtered out (too short or too long)")
    return [kept[i % len(kept)] for i in range(num_prompts)]
