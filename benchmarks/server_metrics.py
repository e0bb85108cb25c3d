"""What the server itself measured during a run, from its Prometheus endpoint.

Scraped before and after each run; the difference of every `kiln_*` histogram's sum and count
gives the server-side mean of that latency over exactly the run's requests (warm-ups
excluded), and counters give what the run added. Kiln's names are in `serving/metrics.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from benchmarks.errors import BenchmarkError

PREFIX = "kiln_"


@dataclass(frozen=True)
class Scrape:
    """Histogram (sum, count) and counter totals per metric family, summed over label sets."""

    histograms: dict[str, tuple[float, float]]
    counters: dict[str, float]


def parse_metrics(text: str, prefix: str = PREFIX) -> Scrape:
    """Parse Prometheus text exposition, keeping families whose name starts with `prefix`."""
    from prometheus_client.parser import text_string_to_metric_families

    histograms: dict[str, tuple[float, float]] = {}
    counters: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith(prefix):
            continue
        if family.type in ("histogram", "summary"):
            total = sum(s.value for s in family.samples if s.name.endswith("_sum"))
            count = sum(s.value for s in family.samples if s.name.endswith("_count"))
            histograms[family.name] = (total, count)
        elif family.type == "counter":
            counters[family.name] = sum(s.value for s in family.samples if s.name.endswith("_total"))
    return Scrape(histograms, counters)


async def scrape(url: str) -> Scrape:
    """GET the metrics endpoint (`http://host:8002/metrics`) and parse it."""
    import httpx

    try:
        async with httpx.AsyncClient(timeout=10.0) as client:
            response = await client.get(url)
    except httpx.HTTPError as exc:
        raise BenchmarkError(f"--metrics-url {url}: cannot reach it ({type(exc).__name__}: {exc})") from None
    if response.status_code != 200:
        raise BenchmarkError(f"--metrics-url {url}: HTTP {response.status_code}")
    return parse_metrics(response.text)


async def scrape_settled(url: str, interval_s: float = 0.2, timeout_s: float = 3.0) -> Scrape:
    """Scrape until two scrapes in a row agree: a server may record a request's latencies just
    after sending its last response, so right after a run the last few may still be missing."""
    import asyncio
    import time

    previous = await scrape(url)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        await asyncio.sleep(interval_s)
        current = await scrape(url)
        if current == previous:
            return current
        previous = current
    return previous


def difference(before: Scrape, after: Scrape) -> dict[str, Any]:
    """What changed between two scrapes: per histogram {count, sum, mean}, per counter its increase."""
    histograms: dict[str, dict[str, float | None]] = {}
    for name, (total, count) in after.histograms.items():
        total0, count0 = before.histograms.get(name, (0.0, 0.0))
        n = count - count0
        histograms[name] = {"count": n, "sum": total - total0, "mean": (total - total0) / n if n > 0 else None}
    counters = {name: value - before.counters.get(name, 0.0) for name, value in after.counters.items()}
    return {"histograms": histograms, "counters": counters}
