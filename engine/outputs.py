"""What the engine hands back for a request: a snapshot after each step, and the final one."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    """The state of one request after an engine step.

    `text` and `token_ids` are cumulative (everything generated so far); `delta_text` and
    `delta_token_ids` are what this step added, so a streaming client concatenating the
    deltas gets exactly `text`. `finish_reason` is None while running, then one of
    "stop" (EOS, stop token or stop string), "length" (max_tokens or max_seq_len),
    "abort" (cancelled) or "error". `logprobs[i]` is the sampled token's log-probability;
    `top_logprobs[i]` maps alternative token ids to theirs (when requested).
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None


@dataclass
class RequestMetrics:
    """Wall-clock timestamps (time.monotonic()) of a request's life, for TTFT/ITL/queue metrics."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
