"""`kiln bench offline` on a tiny engine: Kiln and Hugging Face generate the same number of
tokens from the same prompts, the ratio and the roofline figures are reported, and vLLM's
absence is said plainly (vLLM is turned off here: KILN_VLLM_PYTHON="" — its real run is in
test_offline_vllm.py, `make test-all`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.errors import BenchmarkError
from benchmarks.offline import OfflineBenchConfig, resolve_checkpoint, run_offline_benchmark, summary_lines
from engine.config import load_engine_config


@pytest.fixture(autouse=True)
def no_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_VLLM_PYTHON", "")


def test_offline_kiln_vs_hf_on_a_tiny_engine(bench_engine: Path, tmp_path: Path) -> None:
    config = OfflineBenchConfig(engine=str(bench_engine), batch=4, input_len=16, output_len=32,
                                backends=("kiln", "hf", "vllm"), num_iters=1, warmup=1)
    report = run_offline_benchmark(config)
    by_name = {r.backend: r for r in report.results}
    for name in ("kiln", "hf"):
        r = by_name[name]
        assert r.status == "ok"
        assert r.output_tokens == 4 * 32
        assert r.total_s > r.prefill_s > 0
        assert r.output_tok_s == pytest.approx(128 / r.total_s)
        assert r.decode_steps_per_s == pytest.approx(r.decode_tok_s / 4)
        assert 0 < r.mbu < 1.0
    assert by_name["vllm"].status == "not installed: run make vllm"
    assert "vllm: not installed: run make vllm" in summary_lines(report)
    ratios = report.ratios()
    assert ratios["kiln/hf output_tok_s"] == pytest.approx(by_name["kiln"].output_tok_s / by_name["hf"].output_tok_s)
    assert report.bandwidth is not None and report.bandwidth.gb_per_s > 0
    path = tmp_path / "offline.json"
    report.save(path)
    saved = json.loads(path.read_text())
    assert saved["kind"] == "offline" and saved["config"]["dtype"] == "float32"
    assert saved["environment"]["engine_config"]["architecture"] == "llama"


def test_hf_checkpoint_comes_from_the_engine_source(bench_engine: Path, tiny_checkpoint) -> None:
    engine_cfg = load_engine_config(bench_engine)
    resolved = resolve_checkpoint(OfflineBenchConfig(engine=str(bench_engine)), engine_cfg)
    assert Path(resolved).resolve() == tiny_checkpoint("llama-gqa").resolve()
    with pytest.raises(BenchmarkError, match="--hf-checkpoint"):
        resolve_checkpoint(OfflineBenchConfig(engine=str(bench_engine), hf_checkpoint="/nonexistent"), engine_cfg)


def test_offline_cli_prints_the_table_and_the_ratio(bench_engine: Path) -> None:
    kiln = [sys.executable, "-m", "cli.main"]
    done = subprocess.run([*kiln, "bench", "offline", str(bench_engine), "--batch", "2", "--input-len", "8",
                           "--output-len", "4", "--backend", "kiln,hf", "--num-iters", "1", "--warmup", "0",
                           "--no-bandwidth"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "kiln / hf: " in done.stdout and "x output tok/s" in done.stdout
    assert "vllm" not in done.stdout  # not asked for
