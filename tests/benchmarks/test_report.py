"""Reports: JSON round trip, CSV rows, PNG plots and side-by-side comparison with ratios."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from rich.console import Console

from benchmarks.errors import BenchmarkError
from benchmarks.metrics import RequestRecord, compute_metrics, count_output_tokens
from benchmarks.plots import plot_report
from benchmarks.report import compare_table, print_serve_report, write_csv
from benchmarks.results import RunResult, ServeReport, load_result, load_serve_report


def make_run(rate: float, conc: int | None, speed: float) -> RunResult:
    """Ten 5-token requests, chunk gaps of 10 ms / speed, one every 0.1 s."""
    records = []
    for i in range(10):
        r = RequestRecord(index=i, prompt_len=8, expected_output_len=5, start_time=0.1 * i, sent=True)
        for k in range(5):
            r.on_output("x", r.start_time + (0.05 + 0.01 * k) / speed)
        r.success = True
        r.server_output_tokens = 5
        records.append(r)
    count_output_tokens(records, tokenizer=None)
    duration = max(r.end_time for r in records)
    return RunResult(rate, conc, 1.0, compute_metrics(records, duration, {"ttft": 30.0}), records)


def make_report(speed: float = 1.0) -> ServeReport:
    config = {"backend": "triton-grpc", "model": "ensemble", "dataset": "random", "num_prompts": 10}
    return ServeReport(config=config, environment={"python": "3.11"},
                       runs=[make_run(math.inf, 1, speed), make_run(math.inf, 4, speed)])


def render(table) -> str:
    console = Console(width=250, record=True)
    console.print(table)
    return console.export_text()


def test_json_round_trip_keeps_metrics_records_and_infinite_rate(tmp_path: Path) -> None:
    report = make_report()
    path = tmp_path / "r.json"
    report.save(path)
    text = path.read_text()
    assert "Infinity" not in text  # strict JSON
    loaded = load_serve_report(load_result(path))
    assert [r.metrics for r in loaded.runs] == [r.metrics for r in report.runs]
    assert math.isinf(loaded.runs[0].request_rate)
    assert loaded.runs[1].records[3] == report.runs[1].records[3]
    assert json.loads(text)["config"]["num_prompts"] == 10


def test_csv_has_one_row_per_sweep_point(tmp_path: Path) -> None:
    report = make_report()
    path = tmp_path / "r.csv"
    write_csv(report, path)
    rows = list(csv.DictReader(path.open()))
    assert [row["max_concurrency"] for row in rows] == ["1", "4"]
    assert rows[0]["request_rate"] == "inf"
    assert float(rows[0]["ttft_mean_ms"]) == pytest.approx(50.0)
    assert float(rows[0]["output_throughput"]) == pytest.approx(report.runs[0].metrics.output_throughput)


def test_plots_are_written_as_png(tmp_path: Path) -> None:
    import matplotlib.image

    paths = plot_report(make_report(), tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["latency_cdf.png", "throughput_vs_tpot_p99.png",
                                             "throughput_vs_ttft_p99.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width = matplotlib.image.imread(p).shape[:2]
        assert width > 300 and height > 200


def test_compare_shows_each_file_and_its_ratio_to_the_first(tmp_path: Path) -> None:
    make_report(speed=1.0).save(tmp_path / "a.json")
    make_report(speed=2.0).save(tmp_path / "b.json")
    text = render(compare_table([tmp_path / "a.json", tmp_path / "b.json"]))
    ttft_rows = [line for line in text.splitlines() if "TTFT mean" in line]
    assert len(ttft_rows) == 2  # one per common sweep point
    assert "50" in ttft_rows[0] and "25" in ttft_rows[0] and "0.50x" in ttft_rows[0]


def test_table_prints_every_metric(tmp_path: Path) -> None:
    console = Console(width=200, record=True)
    print_serve_report(make_report(), console)
    text = console.export_text()
    for name in ("TTFT (ms)", "TPOT (ms)", "ITL (ms)", "E2EL (ms)", "request goodput", "sweep"):
        assert name in text


def test_compare_rejects_files_that_are_not_results(tmp_path: Path) -> None:
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    with pytest.raises(BenchmarkError, match="not a result written by"):
        load_result(other)
    with pytest.raises(BenchmarkError, match="no such file"):
        load_result(tmp_path / "missing.json")
