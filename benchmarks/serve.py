"""`kiln bench serve`: build the dataset, then run one load per sweep point against a server.

    config = ServeBenchConfig(backend="triton-grpc", url="127.0.0.1:8001", model="ensemble",
                              tokenizer="engines/smollm2", dataset="random", input_len=128,
                              output_len=128, max_concurrencies=(1, 4, 16, 64), ignore_eos=True)
    report = asyncio.run(run_serve_benchmark(config))

Every sweep point sends the same prompts. Ctrl-C (SIGINT) during a run stops it: in-flight
requests are cancelled, the points not yet run are skipped, and the report holds what was
measured, marked `interrupted`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import signal
from collections.abc import Coroutine, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from benchmarks.backends import BACKENDS, Backend, BackendOptions, make_backend
from benchmarks.datasets import (
    DATASETS,
    SAMPLE_SHAREGPT,
    SampleRequest,
    load_tokenizer,
    prefix_requests,
    random_requests,
    sharegpt_requests,
)
from benchmarks.environment import collect_environment, engine_config
from benchmarks.errors import BenchmarkError
from benchmarks.load import run_load, warm_up
from benchmarks.metrics import compute_metrics, count_output_tokens
from benchmarks.results import RunResult, ServeReport, format_rate, rate_to_json
from benchmarks.server_metrics import difference, scrape_settled


@dataclass(frozen=True)
class ServeBenchConfig:
    """Every knob of a serve benchmark; saved verbatim in the result file (no secrets here)."""

    backend: str
    url: str
    model: str
    tokenizer: str
    dataset: str = "random"
    dataset_path: str | None = None
    input_len: int = 128
    output_len: int = 128
    range_ratio: float = 0.0
    num_prefixes: int = 4
    prefix_len: int = 256
    num_prompts: int = 100
    num_warmups: int = 0
    request_rates: tuple[float, ...] = (math.inf,)
    max_concurrencies: tuple[int | None, ...] = (None,)
    burstiness: float = 1.0
    ignore_eos: bool = False
    temperature: float = 0.0
    slo: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    metrics_url: str | None = None
    request_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise BenchmarkError(f"--backend {self.backend!r} is not one of {sorted(BACKENDS)}")
        if self.dataset not in DATASETS:
            raise BenchmarkError(f"--dataset {self.dataset!r} is not one of {list(DATASETS)}")
        if self.num_prompts < 1:
            raise BenchmarkError(f"--num-prompts must be >= 1, got {self.num_prompts}")
        if self.num_warmups < 0:
            raise BenchmarkError(f"--num-warmups must be >= 0, got {self.num_warmups}")
        for rate in self.request_rates:
            if not rate > 0:
                raise BenchmarkError(f"--request-rate values must be > 0 or inf, got {rate}")
        for conc in self.max_concurrencies:
            if conc is not None and conc < 1:
                raise BenchmarkError(f"--max-concurrency values must be >= 1, got {conc}")

    def points(self) -> Iterator[tuple[float, int | None]]:
        """The sweep: every (request rate, max concurrency) pair, in the order given."""
        return itertools.product(self.request_rates, self.max_concurrencies)

    def to_dict(self) -> dict[str, Any]:
        raw = asdict(self)
        raw["request_rates"] = [rate_to_json(r) for r in self.request_rates]
        raw["max_concurrencies"] = list(self.max_concurrencies)
        return raw


def parse_sweep(values: str, flag: str, allow_inf: bool) -> list[float]:
    """`"1,2,4,inf"` -> [1.0, 2.0, 4.0, inf], with a one-line error naming the flag."""
    out: list[float] = []
    for item in values.split(","):
        item = item.strip().lower()
        if allow_inf and item == "inf":
            out.append(math.inf)
            continue
        try:
            out.append(float(item) if allow_inf else int(item))
        except ValueError:
            raise BenchmarkError(f"{flag}: {item!r} is not a number{' or inf' if allow_inf else ''}") from None
    if not out:
        raise BenchmarkError(f"{flag}: give at least one value")
    return out


def build_requests(config: ServeBenchConfig, tokenizer: Any) -> list[SampleRequest]:
    if config.dataset == "random":
        return random_requests(tokenizer, config.num_prompts, config.input_len, config.output_len,
                               config.range_ratio, config.seed)
    if config.dataset == "prefix":
        return prefix_requests(tokenizer, config.num_prompts, config.num_prefixes, config.prefix_len,
                               config.input_len, config.output_len, config.seed)
    engine = engine_config(config.tokenizer)
    max_seq_len = int(engine["build"]["max_seq_len"]) if engine else 2048
    return sharegpt_requests(config.dataset_path or SAMPLE_SHAREGPT, tokenizer, config.num_prompts,
                             config.output_len if config.ignore_eos else None, max_seq_len, config.seed)


@contextlib.contextmanager
def _sigint_sets(stop: asyncio.Event) -> Iterator[None]:
    """While inside, Ctrl-C sets `stop` instead of raising KeyboardInterrupt."""
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGINT, stop.set)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
        yield
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGINT)


async def _unless_stopped(work: Coroutine[Any, Any, None], stop: asyncio.Event) -> None:
    """Run `work` to its end, or cancel it as soon as `stop` is set (Ctrl-C during warm-up)."""
    task = asyncio.ensure_future(work)
    stop_wait = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([task, stop_wait], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop_wait.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.done() and not task.cancelled():
        task.result()  # a failed test request raises its BenchmarkError here


async def _run_point(
    backend: Backend, config: ServeBenchConfig, requests: list[SampleRequest], tokenizer: Any,
    rate: float, concurrency: int | None, stop: asyncio.Event, progress: Progress,
) -> RunResult:
    label = f"rate={format_rate(rate)}" + (f" conc={concurrency}" if concurrency else "")
    task = progress.add_task(label, total=len(requests))
    before = await scrape_settled(config.metrics_url) if config.metrics_url else None
    result = await run_load(backend, requests, rate, config.burstiness, concurrency, config.seed,
                            on_finished=lambda _: progress.advance(task), stop=stop)
    server = difference(before, await scrape_settled(config.metrics_url)) if before and config.metrics_url else None
    count_output_tokens(result.records, tokenizer)
    metrics = compute_metrics(result.records, result.duration_s, config.slo)
    return RunResult(rate, concurrency, config.burstiness, metrics, result.records, result.interrupted, server)


async def run_serve_benchmark(
    config: ServeBenchConfig, api_key: str | None = None, console: Console | None = None
) -> ServeReport:
    """Run every sweep point of `config` and return the report (see module docstring)."""
    console = console or Console(stderr=True)
    tokenizer = load_tokenizer(config.tokenizer)
    requests = build_requests(config, tokenizer)
    report = ServeReport(config=config.to_dict(), environment=collect_environment(config.tokenizer))
    options = BackendOptions(url=config.url, model=config.model, ignore_eos=config.ignore_eos,
                             temperature=config.temperature, request_timeout_s=config.request_timeout_s,
                             api_key=api_key)
    backend = make_backend(config.backend, options)
    stop = asyncio.Event()
    await backend.start()
    report.serving_backend = backend.serving_backend
    try:
        with _sigint_sets(stop):
            served = f" (served by {backend.serving_backend})" if backend.serving_backend else ""
            console.print(f"[bold]kiln bench serve[/] {config.backend} {config.url} model={config.model}{served}: "
                          f"{len(requests)} prompts ({config.dataset}), warm-up {config.num_warmups}")
            await _unless_stopped(warm_up(backend, requests[0], config.num_warmups, config.max_concurrencies[0]), stop)
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            with Progress(*columns, console=console, transient=False) as progress:
                for rate, concurrency in config.points():
                    if stop.is_set():
                        break
                    run = await _run_point(backend, config, requests, tokenizer, rate, concurrency, stop, progress)
                    report.runs.append(run)
            if stop.is_set():
                console.print("[yellow]interrupted: keeping what was measured[/]")
    finally:
        await backend.close()
    return report


def default_url(backend: str) -> str:
    """Where each backend's server listens by default (`kiln serve`'s ports)."""
    return {"triton-grpc": "127.0.0.1:8001", "triton-http": "http://127.0.0.1:8000"}.get(
        backend, "http://127.0.0.1:9000/v1")

