"""Kiln's Prometheus metrics, exported through Triton's python-backend custom metrics.

They appear on Triton's metrics port (`/metrics`) next to Triton's own `nv_*` metrics, each
labelled with `model` and `instance` (a model instance is one stub process with its own
engine, so gauges of different instances must not overwrite one another):

histograms (seconds)
    kiln_time_to_first_token_seconds    arrival -> first generated token
    kiln_inter_token_latency_seconds    gap between consecutive streamed outputs
    kiln_e2e_request_latency_seconds    arrival -> last token
    kiln_request_queue_time_seconds     arrival -> first scheduled
gauges
    kiln_num_requests_running / kiln_num_requests_waiting
    kiln_kv_cache_usage_ratio           used KV blocks / all KV blocks (0..1)
    kiln_prefix_cache_hit_rate          prompt tokens served from the prefix cache / looked up
    kiln_batch_size_last / kiln_batch_size_max   sequences in the last / largest engine step
counters
    kiln_prompt_tokens_total / kiln_generation_tokens_total / kiln_num_preemptions_total
    kiln_requests_finished_total{finish_reason}   stop | length | abort | error

Every update is a call into the Triton server process (~50 us), so nothing here is called
on the streaming path: the responder only records observations in memory (`record_*`), and
the model's watcher thread publishes them (`flush`) with the engine gauges a few times a second.
"""

from __future__ import annotations

import threading
from typing import Any

from engine.runtime.stats import EngineStats

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)
FINISH_REASONS = ("stop", "length", "abort", "error")


class KilnMetrics:
    """The metric families of one model instance.

    `pb_utils` is the python backend's `triton_python_backend_utils` module (passed in so
    this module imports outside Triton). Create in `initialize()`, call `close()` in
    `finalize()`: Triton requires metrics to be deleted before their families.
    """

    def __init__(self, pb_utils: Any, model_name: str, instance_name: str) -> None:
        family_cls = pb_utils.MetricFamily
        labels = {"model": model_name, "instance": instance_name}
        self._families: list[Any] = []

        def family(name: str, description: str, kind: Any) -> Any:
            created = family_cls(name=name, description=description, kind=kind)
            self._families.append(created)
            return created

        def histogram(name: str, description: str) -> Any:
            return family(name, description, family_cls.HISTOGRAM).Metric(
                labels=labels, buckets=list(LATENCY_BUCKETS)
            )

        def gauge(name: str, description: str) -> Any:
            return family(name, description, family_cls.GAUGE).Metric(labels=labels)

        def counter(name: str, description: str) -> Any:
            return family(name, description, family_cls.COUNTER).Metric(labels=labels)

        self.time_to_first_token = histogram(
            "kiln_time_to_first_token_seconds", "Time from request arrival to its first generated token")
        self.inter_token_latency = histogram(
            "kiln_inter_token_latency_seconds", "Time between consecutive streamed outputs of a request")
        self.e2e_latency = histogram(
            "kiln_e2e_request_latency_seconds", "Time from request arrival to its last token")
        self.queue_time = histogram(
            "kiln_request_queue_time_seconds", "Time from request arrival until it is first scheduled")
        self.num_running = gauge("kiln_num_requests_running", "Requests being generated")
        self.num_waiting = gauge("kiln_num_requests_waiting", "Requests waiting to be scheduled")
        self.kv_cache_usage = gauge("kiln_kv_cache_usage_ratio", "Fraction of KV cache blocks in use (0..1)")
        self.prefix_cache_hit_rate = gauge(
            "kiln_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens looked up")
        self.batch_size_last = gauge("kiln_batch_size_last", "Sequences in the most recent engine step")
        self.batch_size_max = gauge("kiln_batch_size_max", "Largest number of sequences in one engine step")
        self.prompt_tokens = counter("kiln_prompt_tokens_total", "Prompt tokens processed")
        self.generation_tokens = counter("kiln_generation_tokens_total", "Tokens generated")
        self.preemptions = counter("kiln_num_preemptions_total", "Requests preempted for lack of KV blocks")
        finished = family(
            "kiln_requests_finished_total", "Requests finished, by finish reason", family_cls.COUNTER)
        self.finished = {
            reason: finished.Metric(labels={**labels, "finish_reason": reason}) for reason in FINISH_REASONS
        }
        self._last: EngineStats | None = None
        self._pending_lock = threading.Lock()
        self._pending_inter_token: list[float] = []
        self._pending_finished: list[tuple[str, float | None, float | None, float | None]] = []

    def record_inter_token(self, seconds: float) -> None:
        """Remember one inter-token gap (cheap; published by `flush`)."""
        with self._pending_lock:
            self._pending_inter_token.append(seconds)

    def record_finished(
        self, finish_reason: str, queue_time: float | None, ttft: float | None, e2e: float | None
    ) -> None:
        """Remember one finished request (latencies in seconds; None when it never got there)."""
        with self._pending_lock:
            self._pending_finished.append((finish_reason, queue_time, ttft, e2e))

    def flush(self, stats: EngineStats | None = None) -> None:
        """Publish recorded observations and, when given, an engine snapshot."""
        with self._pending_lock:
            gaps, self._pending_inter_token = self._pending_inter_token, []
            finished, self._pending_finished = self._pending_finished, []
        for gap in gaps:
            self.inter_token_latency.observe(gap)
        for reason, queue_time, ttft, e2e in finished:
            self.finished.get(reason, self.finished["error"]).increment(1)
            for histogram, value in ((self.queue_time, queue_time), (self.time_to_first_token, ttft),
                                     (self.e2e_latency, e2e)):
                if value is not None and value >= 0:
                    histogram.observe(value)
        if stats is not None:
            self._update_engine(stats)

    def _update_engine(self, stats: EngineStats) -> None:
        """Set gauges from an engine snapshot and advance counters by what changed since the last one."""
        self.num_running.set(stats.num_running)
        self.num_waiting.set(stats.num_waiting)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        hit_rate = stats.prefix_cache_hits / stats.prefix_cache_queries if stats.prefix_cache_queries else 0.0
        self.prefix_cache_hit_rate.set(hit_rate)
        self.batch_size_last.set(stats.last_batch_size)
        self.batch_size_max.set(stats.max_batch_size_seen)
        last = self._last
        for metric, now, before in (
            (self.prompt_tokens, stats.total_prompt_tokens, last.total_prompt_tokens if last else 0),
            (self.generation_tokens, stats.total_generation_tokens, last.total_generation_tokens if last else 0),
            (self.preemptions, stats.num_preemptions, last.num_preemptions if last else 0),
        ):
            if now > before:
                metric.increment(now - before)
        self._last = stats

    def close(self) -> None:
        """Drop metrics before their families (Triton's required order)."""
        for name in [n for n in vars(self) if not n.startswith("_")]:
            delattr(self, name)
        self._families.clear()
