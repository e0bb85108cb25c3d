"""The one interface every serving backend implements (kiln, hf, ...).

A backend owns a model and a background thread. The Triton model (and anything else that
serves) talks to it only through `Backend`: `add_request` with a prompt (text or token ids),
`engine.SamplingParams` and a request id; the backend calls `callback` with a stream of
`engine.RequestOutput`s for that request (cumulative `text`/`token_ids`, per-step deltas),
the last one with `finished=True` and a `finish_reason` in stop | length | abort | error.
`abort` ends a request early (its final output has finish_reason "abort").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from engine.errors import KilnError
from engine.outputs import RequestOutput
from engine.runtime.stats import EngineStats
from engine.sampling_params import SamplingParams

OutputCallback = Callable[[RequestOutput], None]
BACKEND_NAMES = ("kiln", "vllm", "hf")
CHOICES = ("auto", *BACKEND_NAMES)


class BackendError(KilnError):
    """A backend cannot serve this model (wrong explicit choice, not installed, bad path)."""


@dataclass(frozen=True)
class BackendChoice:
    """Which backend serves a model and why (printed, and written to config.pbtxt)."""

    name: str
    reason: str


class Backend(Protocol):
    """What the Triton model needs from a backend. All methods are thread-safe."""

    name: str
    tokenizer: Any  # transformers PreTrainedTokenizerFast
    max_seq_len: int  # prompt + generated tokens
    vocab_size: int

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    callback: OutputCallback, task: str | None = None) -> None:
        """Validate and enqueue; raise InvalidRequestError at once for bad input. `task` names a
        prompt-tuned task (only engines built with --prompt-table have any)."""
        ...

    def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...

    def shutdown(self) -> None:
        """Stop; requests still in flight get a final output with finish_reason "abort"."""
        ...
