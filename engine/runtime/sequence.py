"""One request's state inside the engine: tokens, KV block table, progress and status."""

from __future__ import annotations

import time
from enum import IntEnum

import torch

from engine.outputs import RequestMetrics
from engine.sampling_params import SamplingParams


class SequenceStatus(IntEnum):
    WAITING = 0
    RUNNING = 1
    FINISHED_STOPPED = 2
    FINISHED_LENGTH = 3
    FINISHED_ABORTED = 4

    def is_finished(self) -> bool:
        return self >= SequenceStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return {
            SequenceStatus.FINISHED_STOPPED: "stop",
            SequenceStatus.FINISHED_LENGTH: "length",
            SequenceStatus.FINISHED_ABORTED: "abort",
        }.get(self)


class Sequence:
    """A request as the scheduler and model runner see it.

    `num_computed_tokens` counts the leading tokens of `token_ids` whose K/V are in the
    paged cache. A step computes `token_ids[num_computed_tokens : num_computed_tokens + n]`;
    when that reaches the end of `token_ids`, the step also samples the next token. A decode
    is simply the case n == 1. Preemption (recompute) resets `num_computed_tokens` to 0 and
    keeps the generated tokens, so the request resumes where it stopped.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        arrival_time: float | None = None,
        task: str | None = None,
        num_virtual_tokens: int = 0,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        # A prompt-tuned task's virtual tokens come first (positions 0..V-1); their ids are
        # placeholders, the model runner embeds them from the engine's prompt table.
        self.task = task
        self.num_virtual_tokens = num_virtual_tokens
        self.token_ids = [0] * num_virtual_tokens + list(prompt_token_ids)
        self.params = params
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache (first schedule)
        self.num_preemptions = 0
        self.stop_reason: str | int | None = None
        self.logprobs: list[float] = []
        self.top_logprobs: list[dict[int, float]] = []
        self.cumulative_logprob = 0.0
        self.generator: torch.Generator | None = (
            torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        )
        self.bad_words_token_ids: list[list[int]] = []
        self.metrics = RequestMetrics(arrival_time=arrival_time if arrival_time is not None else time.monotonic())

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_virtual_tokens - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_virtual_tokens + len(self.prompt_token_ids):]

    @property
    def real_token_ids(self) -> list[int]:
        """Prompt and output tokens, without virtual-token placeholders."""
        return self.token_ids[self.num_virtual_tokens:]

    @property
    def cache_salt(self) -> int | None:
        """Seeds the prefix-cache hash chain: equal token ids under different tasks differ."""
        return hash(("task", self.task)) if self.task is not None else None

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished()

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, status={self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={self.block_table})"
        )
