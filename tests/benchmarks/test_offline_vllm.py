"""`kiln bench offline --backend kiln,vllm` for real (run by `make test-all`, after `make vllm`;
not in `make test`: vLLM's engine start alone takes 70-140 s here).

A tiny random Llama (head size 64, which vLLM's CPU attention supports) and its Kiln engine:
the vLLM row is measured in .venv-vllm by benchmarks/vllm_offline.py, both rows are ok with
exactly batch x output_len tokens, and nothing of vLLM is left running afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from serving.backends.vllm import vllm_python
from tests.tiny_models import make_checkpoint

ROOT = Path(__file__).parents[2]
BATCH, INPUT_LEN, OUTPUT_LEN = 4, 16, 12


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert vllm_python() is not None, "vLLM is not installed: run make vllm first (make test-all does)"
    return make_checkpoint("llama-gqa", tmp_path_factory.mktemp("llama-vllm-bench"), hidden_size=128,
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)


def _bench_processes() -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "vllm_offline.py" in cmdline:
            found.append(f"{entry}: {cmdline}")
    return found


def test_offline_bench_measures_kiln_and_vllm_side_by_side(llama: Path, tmp_path: Path) -> None:
    from engine.build.builder import BuildOptions, build_engine

    engine = build_engine(llama, tmp_path / "engine", BuildOptions(dtype="float32", max_seq_len=256),
                          progress=False)
    out = tmp_path / "offline.json"
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "bench", "offline", str(engine), "--hf-checkpoint", str(llama),
         "--backend", "kiln,vllm", "--batch", str(BATCH), "--input-len", str(INPUT_LEN), "--output-len",
         str(OUTPUT_LEN), "--num-iters", "1", "--warmup", "1", "--no-bandwidth", "--out", str(out)],
        capture_output=True, text=True, timeout=900, cwd=ROOT, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["backend"]: r for r in json.loads(out.read_text())["results"]}
    for name in ("kiln", "vllm"):
        row = rows[name]
        assert row["status"] == "ok", row  # a run with the wrong token counts would say "failed: generated ..."
        assert row["output_tokens"] == BATCH * OUTPUT_LEN
        assert row["total_s"] > row["prefill_s"] > 0 and row["load_s"] > 0, row
    assert "kiln / vllm: " in done.stdout and "x output tok/s" in done.stdout
    assert _bench_processes() == []
