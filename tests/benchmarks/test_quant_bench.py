"""`kiln bench quant` on a tiny checkpoint: every row built, gated, sized and timed; quantized
engines smaller than bfloat16 by the expected factor; JSON, table and plot written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tiny_models import make_checkpoint  # on sys.path via tests/conftest.py


def test_bench_quant_cli_on_a_tiny_checkpoint(tmp_path: Path) -> None:
    ckpt = make_checkpoint("llama-gqa", tmp_path / "ckpt", hidden_size=128, intermediate_size=256)
    out = tmp_path / "quant.json"
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "bench", "quant", "--checkpoint", str(ckpt), "--work", str(tmp_path / "w"),
         "--configs", "bfloat16,int8,int4-awq", "--batches", "1,2", "--calib-size", "2", "--awq-calib-size", "1",
         "--new-tokens", "4", "--iters", "1", "--out", str(out), "--plot", str(tmp_path / "plots")],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["config"]: r for r in json.loads(out.read_text())}
    assert list(rows) == ["bfloat16", "int8", "int4-awq"]
    for row in rows.values():
        assert row["decode_tok_s_b1"] > 0 and row["decode_tok_s_b2"] > 0
        assert row["resident_weight_bytes"] > 0
    assert rows["bfloat16"]["accuracy"] is None
    for label in ("int8", "int4-awq"):
        acc = rows[label]["accuracy"]
        assert acc["num_tokens"] > 0 and acc["ppl_ratio"] > 0
    # Linear weights and the vocab table go from 2 bytes to 1 (int8) and ~0.5 + table 1 (int4).
    bf16 = rows["bfloat16"]["engine_bytes"]
    assert 1.8 < bf16 / rows["int8"]["engine_bytes"] < 2.0
    assert bf16 / rows["int4-awq"]["engine_bytes"] > 2.2
    assert rows["int8"]["resident_weight_bytes"] < rows["bfloat16"]["resident_weight_bytes"]
    assert "Quantized engines" in result.stdout and "int4-awq" in result.stdout
    assert (tmp_path / "plots" / "quant.png").stat().st_size > 1000


def test_bench_quant_rejects_unknown_rows(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "bench", "quant", "--work", str(tmp_path), "--configs", "int3"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "--configs: unknown ['int3']" in result.stderr
    assert "Traceback" not in result.stderr
