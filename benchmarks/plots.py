"""PNG plots of a serve benchmark (matplotlib, Agg backend: no display needed).

- `throughput_vs_ttft_p99.png`, `throughput_vs_tpot_p99.png`: output token throughput against
  p99 latency, one point per sweep point, labelled with its rate/concurrency — the curve
  people read to pick an operating point.
- `latency_cdf.png`: empirical CDFs of TTFT, TPOT and E2EL, one line per sweep point.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.metrics import request_tpot
from benchmarks.results import ServeReport


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(report: ServeReport) -> str:
    cfg = report.config
    return f"{cfg.get('backend')} {cfg.get('model')} ({cfg.get('dataset')}, {cfg.get('num_prompts')} prompts)"


def plot_report(report: ServeReport, out_dir: str | Path) -> list[Path]:
    """Write the plots into `out_dir` (created) and return their paths."""
    plt = _pyplot()
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    runs = [run for run in report.runs if run.metrics.completed]

    for metric, label in (("ttft", "p99 TTFT (ms)"), ("tpot", "p99 TPOT (ms)")):
        fig, ax = plt.subplots(figsize=(6.4, 4.8))
        xs = [run.metrics.output_throughput for run in runs]
        ys = [getattr(run.metrics, f"{metric}_ms").p99 for run in runs]
        ax.plot(xs, ys, marker="o")
        for run, x, y in zip(runs, xs, ys, strict=True):
            ax.annotate(run.label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("output token throughput (tok/s)")
        ax.set_ylabel(label)
        ax.set_title(_title(report), fontsize=9)
        ax.grid(True, alpha=0.3)
        path = directory / f"throughput_vs_{metric}_p99.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, metric in zip(axes, ("TTFT", "TPOT", "E2EL"), strict=True):
        for run in runs:
            done = [r for r in run.records if r.success]
            if metric == "TTFT":
                values = [r.ttft * 1000 for r in done if r.ttft is not None]
            elif metric == "TPOT":
                values = [t * 1000 for t in (request_tpot(r) for r in done) if t is not None]
            else:
                values = [r.latency * 1000 for r in done]
            if values:
                ordered = np.sort(values)
                ax.step(ordered, np.arange(1, len(ordered) + 1) / len(ordered), where="post", label=run.label)
        ax.set_xlabel(f"{metric} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(_title(report), fontsize=9)
    fig.tight_layout()
    path = directory / "latency_cdf.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
    return written
