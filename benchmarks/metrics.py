"""Per-request records and the serving metrics computed from them.

Definitions are those of vLLM's `vllm bench serve` (`vllm/benchmarks/serve.py`), so that
numbers compare across tools:

- TTFT: first streamed chunk that carries output (even empty text) − send time.
- ITL: every gap between consecutive output chunks, pooled over all requests. A chunk may
  carry several tokens, so ITL is a per-chunk latency, not per-token.
- E2EL: last output chunk − send time.
- TPOT: (E2EL − TTFT) / (output tokens − 1), only for requests with more than one output
  token; for goodput a request with ≤ 1 output token has TPOT 0.
- Output tokens: the server's own count where it reports one (OpenAI `usage`), otherwise the
  streamed text re-tokenized with the model's tokenizer — never the number of chunks.
- Throughputs divide by the benchmark duration (first dispatch to last completion).
- Goodput: completed requests whose every SLO'd metric is ≤ its SLO (ms), per second.
- Percentiles: numpy's default linear interpolation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from benchmarks.errors import BenchmarkError

SLO_METRICS = ("ttft", "tpot", "e2el")
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")


class TokenCounter(Protocol):
    """The part of a Hugging Face tokenizer the metrics need."""

    def __call__(self, text: str, add_special_tokens: bool = ...) -> Any: ...


@dataclass
class RequestRecord:
    """What happened to one request. Times are seconds; `arrival_time` and `start_time` are
    relative to the benchmark start. A backend fills the record in place while streaming, so a
    request interrupted mid-stream keeps what was measured so far.

    `arrival_time` is when the load generator released the request; `start_time` when it was
    sent (later if the concurrency limit made it wait). For a successful request `latency` is
    E2EL (last output chunk − send); for a failed or cancelled one it is how long it was in
    flight, so that the slot it held shows in `peak_concurrency`.
    """

    index: int
    prompt_len: int
    expected_output_len: int
    arrival_time: float = 0.0
    start_time: float = 0.0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    generated_text: str = ""
    num_chunks: int = 0
    server_output_tokens: int | None = None
    output_tokens: int = 0
    sent: bool = False
    success: bool = False
    cancelled: bool = False
    error: str = ""

    def on_output(self, text: str, now: float) -> None:
        """Account one streamed chunk that carries output (`now`: seconds since benchmark start)."""
        elapsed = now - self.start_time
        if self.ttft is None:
            self.ttft = elapsed
        else:
            self.itl.append(elapsed - self.latency)
        self.latency = elapsed
        self.generated_text += text
        self.num_chunks += 1

    @property
    def end_time(self) -> float:
        return self.start_time + self.latency

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> RequestRecord:
        return cls(**dict(raw))


@dataclass(frozen=True)
class Distribution:
    """Summary of one latency metric in milliseconds. `count == 0` means no samples; the other
    fields are then 0, as in vLLM's report."""

    count: int
    mean: float
    median: float
    std: float
    p90: float
    p99: float
    min: float
    max: float

    @classmethod
    def of_seconds(cls, values: Sequence[float]) -> Distribution:
        if not values:
            return cls(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        ms = np.asarray(values, dtype=np.float64) * 1000.0
        return cls(
            count=int(ms.size),
            mean=float(ms.mean()),
            median=float(np.median(ms)),
            std=float(ms.std()),
            p90=float(np.percentile(ms, 90)),
            p99=float(np.percentile(ms, 99)),
            min=float(ms.min()),
            max=float(ms.max()),
        )


@dataclass(frozen=True)
class BenchmarkMetrics:
    """Aggregate figures of one benchmark run (one point of a sweep)."""

    completed: int
    failed: int
    cancelled: int
    total_input_tokens: int
    total_output_tokens: int
    duration_s: float
    request_throughput: float
    request_goodput: float | None
    output_throughput: float
    total_token_throughput: float
    peak_concurrency: int
    ttft_ms: Distribution
    tpot_ms: Distribution
    itl_ms: Distribution
    e2el_ms: Distribution

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> BenchmarkMetrics:
        values = dict(raw)
        for name in LATENCY_METRICS:
            values[f"{name}_ms"] = Distribution(**values[f"{name}_ms"])
        return cls(**values)


def parse_slo(spec: str | None) -> dict[str, float]:
    """`"ttft:200,tpot:50"` -> {"ttft": 200.0, "tpot": 50.0} (milliseconds)."""
    if not spec:
        return {}
    slos: dict[str, float] = {}
    for item in spec.split(","):
        name, sep, value = item.strip().partition(":")
        name = name.strip().lower()
        if not sep or name not in SLO_METRICS:
            raise BenchmarkError(
                f"--slo: {item.strip()!r} is not NAME:MS with NAME one of {list(SLO_METRICS)} "
                "(example: --slo ttft:200,tpot:50)"
            )
        try:
            ms = float(value)
        except ValueError:
            raise BenchmarkError(f"--slo: {value.strip()!r} for {name} is not a number of milliseconds") from None
        if not ms > 0:
            raise BenchmarkError(f"--slo: {name} must be > 0 ms, got {ms}")
        slos[name] = ms
    return slos


def count_output_tokens(records: Iterable[RequestRecord], tokenizer: TokenCounter | None) -> None:
    """Set `output_tokens` of each successful record: the server's count when it gave one,
    else the re-tokenized streamed text (no special tokens added)."""
    for record in records:
        if not record.success:
            record.output_tokens = 0
        elif record.server_output_tokens is not None:
            record.output_tokens = record.server_output_tokens
        elif tokenizer is None:
            raise BenchmarkError("a tokenizer is needed to count output tokens (pass --tokenizer)")
        else:
            record.output_tokens = len(tokenizer(record.generated_text, add_special_tokens=False)["input_ids"])


def request_tpot(record: RequestRecord) -> float | None:
    """(E2EL − TTFT) / (output tokens − 1) in seconds, or None when ≤ 1 output token."""
    if record.output_tokens <= 1 or record.ttft is None:
        return None
    return (record.latency - record.ttft) / (record.output_tokens - 1)


def peak_concurrency(records: Iterable[RequestRecord]) -> int:
    """Most requests in flight at once, over half-open [start, end) intervals of every request
    that was sent (failed ones included: they occupied a slot too)."""
    events: list[tuple[float, int]] = []
    for r in records:
        if r.sent:
            events.append((r.start_time, 1))
            events.append((r.end_time, -1))
    events.sort()  # at equal times -1 sorts before +1: a finishing request frees its slot first
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def compute_metrics(
    records: Sequence[RequestRecord], duration_s: float, slos: Mapping[str, float] | None = None
) -> BenchmarkMetrics:
    """Aggregate records (with `output_tokens` already counted) into vLLM's figures."""
    if duration_s <= 0:
        raise BenchmarkError(f"benchmark duration must be > 0 s, got {duration_s}")
    done = [r for r in records if r.success]
    ttfts = [r.ttft for r in done if r.ttft is not None]
    e2els = [r.latency for r in done]
    itls = [gap for r in done for gap in r.itl]
    tpots = [t for t in (request_tpot(r) for r in done) if t is not None]
    total_in = sum(r.prompt_len for r in done)
    total_out = sum(r.output_tokens for r in done)

    goodput: float | None = None
    if slos:
        limits_s = {name: ms / 1000.0 for name, ms in slos.items()}
        good = 0
        for r in done:
            observed = {"ttft": r.ttft or 0.0, "tpot": request_tpot(r) or 0.0, "e2el": r.latency}
            if all(observed[name] <= limit for name, limit in limits_s.items()):
                good += 1
        goodput = good / duration_s

    return BenchmarkMetrics(
        completed=len(done),
        failed=sum(1 for r in records if not r.success and not r.cancelled),
        cancelled=sum(1 for r in records if r.cancelled),
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        duration_s=duration_s,
        request_throughput=len(done) / duration_s,
        request_goodput=goodput,
        output_throughput=total_out / duration_s,
        total_token_throughput=(total_in + total_out) / duration_s,
        peak_concurrency=peak_concurrency(records),
        ttft_ms=Distribution.of_seconds(ttfts),
        tpot_ms=Distribution.of_seconds(tpots),
        itl_ms=Distribution.of_seconds(itls),
        e2el_ms=Distribution.of_seconds(e2els),
    )
