"""The load generator: when requests are released, how many may be in flight, and the run.

Arrivals follow vLLM's `bench serve`: inter-arrival gaps are drawn from a gamma distribution
with shape `burstiness` and mean `1 / request_rate` (burstiness 1 is a Poisson process;
below 1 burstier, above 1 more regular), accumulated, then scaled so that the last request
is released at exactly `num_requests / request_rate` — removing the 1–2 % seed-to-seed
wobble of the total, as vLLM does. `request_rate = inf` releases everything at once.
`max_concurrency` caps requests in flight with a semaphore; a released request waits for a
slot, and its record keeps both times (`arrival_time`, `start_time`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from benchmarks.backends.base import Backend
from benchmarks.datasets import SampleRequest
from benchmarks.errors import BenchmarkError
from benchmarks.metrics import RequestRecord


def arrival_offsets(num_requests: int, request_rate: float, burstiness: float, seed: int) -> list[float]:
    """Release time of each request, in seconds after the benchmark starts (non-decreasing)."""
    if num_requests < 1:
        raise BenchmarkError(f"--num-prompts must be >= 1, got {num_requests}")
    if not request_rate > 0:
        raise BenchmarkError(f"--request-rate must be > 0 or inf, got {request_rate}")
    if not burstiness > 0:
        raise BenchmarkError(f"--burstiness must be > 0, got {burstiness}")
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num_requests)
    offsets = np.cumsum(gaps)
    offsets *= (num_requests / request_rate) / offsets[-1]
    return [float(x) for x in offsets]


@dataclass
class LoadResult:
    """Records of every request (sent or not), the run's duration, and whether it was stopped."""

    records: list[RequestRecord]
    duration_s: float
    interrupted: bool


async def _send_one(backend: Backend, request: SampleRequest, record: RequestRecord) -> None:
    record.start_time = backend.now()
    record.sent = True
    try:
        await backend.send(request, record)
    except asyncio.CancelledError:
        record.cancelled = True
        record.success = False
        record.error = "interrupted"
        record.latency = backend.now() - record.start_time
        raise
    if not record.success:
        record.latency = backend.now() - record.start_time


async def run_load(
    backend: Backend,
    requests: Sequence[SampleRequest],
    request_rate: float,
    burstiness: float = 1.0,
    max_concurrency: int | None = None,
    seed: int = 0,
    on_finished: Callable[[RequestRecord], None] | None = None,
    stop: asyncio.Event | None = None,
) -> LoadResult:
    """Send `requests` in order at the scheduled times and wait for all of them.

    Setting `stop` ends the run early: nothing more is sent, in-flight requests are cancelled
    (records marked `cancelled`) and the records measured so far are returned with
    `interrupted=True`. `on_finished` is called once per request that ran to its end.
    """
    if max_concurrency is not None and max_concurrency < 1:
        raise BenchmarkError(f"--max-concurrency must be >= 1, got {max_concurrency}")
    offsets = arrival_offsets(len(requests), request_rate, burstiness, seed)
    records = [
        RequestRecord(index=i, prompt_len=r.prompt_len, expected_output_len=r.expected_output_len)
        for i, r in enumerate(requests)
    ]
    stop = stop or asyncio.Event()
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def run_one(i: int) -> None:
        if slots is None:
            await _send_one(backend, requests[i], records[i])
        else:
            async with slots:
                await _send_one(backend, requests[i], records[i])
        if on_finished is not None:
            on_finished(records[i])

    backend.clock_origin = time.perf_counter()
    tasks: list[asyncio.Task[None]] = []
    stop_wait = asyncio.ensure_future(stop.wait())
    try:
        for i, offset in enumerate(offsets):
            delay = offset - backend.now()
            if delay > 0:
                await asyncio.wait([stop_wait], timeout=delay)
            if stop.is_set():
                break
            records[i].arrival_time = backend.now()
            tasks.append(asyncio.create_task(run_one(i)))
        if tasks and not stop.is_set():
            all_done = asyncio.ensure_future(asyncio.wait(tasks))
            await asyncio.wait([all_done, stop_wait], return_when=asyncio.FIRST_COMPLETED)
            all_done.cancel()
    finally:
        interrupted = stop.is_set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        stop_wait.cancel()
    duration = backend.now()
    for task in tasks:  # a backend bug must surface, not vanish into a failed record
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    for record in records:
        if not record.sent:
            record.cancelled = True
            record.error = "not sent (interrupted)"
    return LoadResult(records=records, duration_s=duration, interrupted=interrupted)


async def warm_up(backend: Backend, request: SampleRequest, num_warmups: int, max_concurrency: int | None) -> None:
    """Send one test request (raising a clear error if it fails), then `num_warmups` copies
    of it under the concurrency limit. Nothing of this is measured."""
    probe = RequestRecord(index=-1, prompt_len=request.prompt_len, expected_output_len=request.expected_output_len)
    probe.start_time = backend.now()
    await backend.send(request, probe)
    if not probe.success:
        raise BenchmarkError(f"the first test request failed, check --url/--model/--backend: {probe.error}")
    if num_warmups > 0:
        slots = asyncio.Semaphore(max_concurrency or num_warmups)

        async def one(i: int) -> None:
            async with slots:
                record = RequestRecord(index=-2 - i, prompt_len=request.prompt_len,
                                       expected_output_len=request.expected_output_len)
                record.start_time = backend.now()
                await backend.send(request, record)

        await asyncio.gather(*(one(i) for i in range(num_warmups)))
