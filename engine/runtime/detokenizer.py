"""Incremental detokenization that streams exactly the text a full decode gives.

Byte-level BPE tokens can end in the middle of a UTF-8 character (CJK, emoji), and
SentencePiece tokens carry their leading space only in context, so decoding one token at a
time is wrong. Like vLLM and TGI, each step decodes a short window of recent tokens twice —
with and without the new ones — and emits the difference, holding back text that ends in an
incomplete character (U+FFFD) until the next token completes it.

Stop strings are found here too. While a stop string could still be forming at the end of
the text, that tail is held back, so streamed text never shows part of a stop string.
"""

from __future__ import annotations

from typing import Any

# How many prompt tokens give the first output token its context (leading space etc.).
_INITIAL_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], stop: tuple[str, ...] = (),
                 skip_special_tokens: bool = True, include_stop_str_in_output: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.token_ids: list[int] = list(prompt_token_ids[-_INITIAL_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        self.text = ""  # all decoded output text (before stop-string truncation)
        self.emitted = 0  # characters of `text` already handed out
        self.stopped_by: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def add_token(self, token_id: int) -> None:
        """Append one generated token; afterwards `stopped_by` tells if a stop string matched."""
        self.token_ids.append(token_id)
        prefix_text = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.token_ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return  # wait for the rest of the character
        # Prefix decodes may differ in their last char when the window shifts; take the suffix.
        delta = new_text[len(prefix_text):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        search_from = max(0, len(self.text) - self.holdback)
        self.text += delta
        if self.stop and self.stopped_by is None:
            self._find_stop(search_from)

    def _find_stop(self, search_from: int) -> None:
        best: tuple[int, str] | None = None
        for s in self.stop:
            pos = self.text.find(s, search_from)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, s)
        if best is not None:
            pos, s = best
            self.text = self.text[: pos + len(s) if self.include_stop else pos]
            self.stopped_by = s

    def take_delta(self, finished: bool) -> str:
        """Text not yet handed out. While running, the last `holdback` characters wait in
        case they begin a stop string; when finished, everything is released."""
        end = len(self.text) if finished or self.stopped_by else max(self.emitted, len(self.text) - self.holdback)
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta

    @property
    def output_text(self) -> str:
        return self.text[: self.emitted]
