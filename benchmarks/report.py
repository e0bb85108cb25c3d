"""How results are shown and exported: rich tables, CSV, and side-by-side comparisons."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.metrics import LATENCY_METRICS, Distribution
from benchmarks.results import RunResult, ServeReport, format_rate, load_result, load_serve_report

SERVER_TTFT = "kiln_time_to_first_token_seconds"
_STATS = ("mean", "median", "p90", "p99", "std")


def server_ttft_ms(run: RunResult) -> float | None:
    """The server's own mean TTFT over the run (ms), from its kiln_* histogram, if scraped."""
    hist = (run.server_metrics or {}).get("histograms", {}).get(SERVER_TTFT)
    return hist["mean"] * 1000.0 if hist and hist.get("mean") is not None else None


def run_table(run: RunResult, serving_backend: str | None = None) -> Table:
    """vLLM's result block as a table: counts and throughputs, then each latency's statistics;
    the title names the sweep point and, when known, what served the model."""
    m = run.metrics
    served = f" served by {serving_backend}" if serving_backend else ""
    title = f"{run.label}{served}" + (" [yellow](interrupted)[/]" if run.interrupted else "")
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    for stat in _STATS:
        table.add_column(stat, justify="right")
    failed = f"{m.failed}" + (f" (+{m.cancelled} cancelled)" if m.cancelled else "")
    rows: list[tuple[str, str]] = [
        ("successful requests", f"{m.completed}"),
        ("failed requests", failed),
        ("benchmark duration (s)", f"{m.duration_s:.2f}"),
        ("total input tokens", f"{m.total_input_tokens}"),
        ("total output tokens", f"{m.total_output_tokens}"),
        ("request throughput (req/s)", f"{m.request_throughput:.2f}"),
        ("output token throughput (tok/s)", f"{m.output_throughput:.2f}"),
        ("total token throughput (tok/s)", f"{m.total_token_throughput:.2f}"),
        ("peak concurrent requests", f"{m.peak_concurrency}"),
    ]
    if m.request_goodput is not None:
        rows.append(("request goodput (req/s)", f"{m.request_goodput:.2f}"))
    server = server_ttft_ms(run)
    if server is not None:
        rows.append(("server TTFT mean (ms, kiln_* histogram)", f"{server:.2f}"))
    for name, value in rows:
        table.add_row(name, value, "", "", "", "")
    table.add_section()
    for name in LATENCY_METRICS:
        dist: Distribution = getattr(m, f"{name}_ms")
        table.add_row(f"{name.upper()} (ms)", *(f"{getattr(dist, s):.2f}" for s in _STATS))
    return table


def sweep_table(runs: Sequence[RunResult]) -> Table:
    """One row per sweep point: throughput against tail latency."""
    table = Table(title="sweep", title_justify="left")
    for col in ("rate", "conc", "ok/fail", "req/s", "out tok/s", "goodput", "TTFT mean", "TTFT p99",
                "TPOT mean", "TPOT p99", "ITL p99", "E2EL p99"):
        table.add_column(col, justify="right")
    for run in runs:
        m = run.metrics
        table.add_row(
            format_rate(run.request_rate), str(run.max_concurrency or "-"), f"{m.completed}/{m.failed}",
            f"{m.request_throughput:.2f}", f"{m.output_throughput:.1f}",
            "-" if m.request_goodput is None else f"{m.request_goodput:.2f}",
            f"{m.ttft_ms.mean:.1f}", f"{m.ttft_ms.p99:.1f}", f"{m.tpot_ms.mean:.2f}", f"{m.tpot_ms.p99:.2f}",
            f"{m.itl_ms.p99:.2f}", f"{m.e2el_ms.p99:.1f}",
        )
    return table


def print_serve_report(report: ServeReport, console: Console) -> None:
    for run in report.runs:
        console.print(run_table(run, report.serving_backend))
        failures = [r.error for r in run.records if not r.success and not r.cancelled]
        for error in failures[:3]:
            console.print(f"[red]failed:[/] {error}", highlight=False)
    if len(report.runs) > 1:
        console.print(sweep_table(report.runs))
    if not report.runs:
        console.print("[yellow]no run completed[/]")


def csv_row(run: RunResult) -> dict[str, Any]:
    m = run.metrics
    row: dict[str, Any] = {
        "request_rate": format_rate(run.request_rate),
        "max_concurrency": run.max_concurrency if run.max_concurrency is not None else "",
        "burstiness": run.burstiness,
        "interrupted": run.interrupted,
    }
    for key in ("completed", "failed", "cancelled", "total_input_tokens", "total_output_tokens", "duration_s",
                "request_throughput", "request_goodput", "output_throughput", "total_token_throughput",
                "peak_concurrency"):
        value = getattr(m, key)
        row[key] = "" if value is None else value
    for name in LATENCY_METRICS:
        dist: Distribution = getattr(m, f"{name}_ms")
        for stat in _STATS:
            row[f"{name}_{stat}_ms"] = getattr(dist, stat)
    server = server_ttft_ms(run)
    row["server_ttft_mean_ms"] = "" if server is None else server
    return row


def write_csv(report: ServeReport, path: str | Path) -> None:
    """One row per sweep point with every aggregate figure."""
    rows = [csv_row(run) for run in report.runs]
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", newline="") as handle:
        if not rows:
            return
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


# name -> True when higher is better
_SERVE_FIGURES: dict[str, bool] = {
    "request throughput (req/s)": True,
    "output throughput (tok/s)": True,
    "total token throughput (tok/s)": True,
    "goodput (req/s)": True,
    "failed requests": False,
    **{f"{name.upper()} {stat} (ms)": False for name in LATENCY_METRICS for stat in ("mean", "median", "p99")},
}


def figures(raw: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Comparable figures of a result file: {point label: {figure name: value}}."""
    out: dict[str, dict[str, float]] = {}
    if raw["kind"] == "serve":
        for run in load_serve_report(raw).runs:
            m = run.metrics
            point: dict[str, float] = {
                "request throughput (req/s)": m.request_throughput,
                "output throughput (tok/s)": m.output_throughput,
                "total token throughput (tok/s)": m.total_token_throughput,
                "failed requests": float(m.failed),
            }
            if m.request_goodput is not None:
                point["goodput (req/s)"] = m.request_goodput
            for name in LATENCY_METRICS:
                dist: Distribution = getattr(m, f"{name}_ms")
                for stat in ("mean", "median", "p99"):
                    point[f"{name.upper()} {stat} (ms)"] = getattr(dist, stat)
            out[run.label] = point
    else:
        cfg = raw.get("config", {})
        label = f"batch={cfg.get('batch')} in={cfg.get('input_len')} out={cfg.get('output_len')} {cfg.get('dtype')}"
        point = {}
        for result in raw.get("results", []):
            if result.get("status") != "ok":
                continue
            for key in ("output_tok_s", "decode_tok_s", "prefill_tok_s", "mbu"):
                if result.get(key) is not None:
                    point[f"{result['backend']} {key}"] = float(result[key])
        out[label] = point
    return out


def _higher_is_better(name: str) -> bool | None:
    if name in _SERVE_FIGURES:
        return _SERVE_FIGURES[name]
    if name.endswith(("tok_s", "mbu")):
        return True
    return None


def compare_table(paths: Sequence[str | Path]) -> Table:
    """Figures of several result files side by side, with each file's ratio to the first.

    Sweep points are matched by label (rate and concurrency); when the files share none and
    each holds one point, those points are compared directly.
    """
    names = [Path(p).name for p in paths]
    per_file = [figures(load_result(p)) for p in paths]
    common = [label for label in per_file[0] if all(label in f for f in per_file[1:])]
    if common:
        pairs = [(label, [f[label] for f in per_file]) for label in common]
    elif all(len(f) == 1 for f in per_file):
        pairs = [("run", [next(iter(f.values())) for f in per_file])]
    else:
        pairs = []
    table = Table(title="comparison (ratio = file / first file)", title_justify="left")
    table.add_column("point")
    table.add_column("figure")
    for i, name in enumerate(names):
        table.add_column(name, justify="right")
        if i:
            table.add_column("ratio", justify="right")
    for label, points in pairs:
        for figure in points[0]:
            cells = [label, figure]
            base = points[0].get(figure)
            for i, point in enumerate(points):
                value = point.get(figure)
                cells.append("-" if value is None else f"{value:.4g}")
                if i:
                    cells.append(_ratio_cell(base, value, _higher_is_better(figure)))
            table.add_row(*cells)
        table.add_section()
    if not pairs:
        table.add_row("(no common sweep point)", "", *([""] * (2 * len(names) - 1)))
    return table


def _ratio_cell(base: float | None, value: float | None, higher_better: bool | None) -> str:
    if base is None or value is None or base == 0 or math.isnan(base):
        return "-"
    ratio = value / base
    if higher_better is None or abs(ratio - 1.0) < 0.02:
        return f"{ratio:.2f}x"
    good = (ratio > 1.0) == higher_better
    return f"[{'green' if good else 'red'}]{ratio:.2f}x[/]"
