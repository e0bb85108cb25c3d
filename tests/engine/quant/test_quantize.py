"""`build_engine` with quantization: ModelOpt calibration, the accuracy gate (pass, fail, --force),
the `--export-hf` round trip, and flag errors. (AWQ versus round-to-nearest int4 on SmolLM2:
test_smollm2_int4.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.build.builder import BuildOptions, build_engine
from engine.errors import BuildError, CheckpointError

PROMPTS = ["A classic is something that everyone wants to have read", "A horse! A horse!"]


def test_gate_passes_and_export_round_trips(quant_checkpoint: Path, tmp_path: Path) -> None:
    from engine import LLM, SamplingParams

    export = tmp_path / "modelopt-int8"
    engine = build_engine(quant_checkpoint, tmp_path / "int8", progress=False,
                          options=BuildOptions(dtype="float32", quantization="int8_wo", calib_size=2,
                                               export_hf=str(export)))
    report = json.loads((engine / "build_report.json").read_text())
    acc = report["accuracy"]
    assert acc["passed"] and acc["budget"] == 1.02 and acc["ppl_ratio"] <= 1.02
    assert 0.9 <= acc["top1_agreement"] <= 1.0 and 0.0 <= acc["greedy_match"] <= 1.0 and acc["num_tokens"] > 500
    assert report["calibration"]["config"] == "INT8_WEIGHT_ONLY_CFG"
    assert json.loads((export / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "W8A16"

    # The direct build quantized the vocab table to int8 ("auto"); a ModelOpt checkpoint keeps its
    # table unless asked, so ask for the same engine.
    assert json.loads((engine / "config.json").read_text())["build"]["quantization"]["embedding"] == "int8"
    rebuilt = build_engine(export, tmp_path / "from-export", BuildOptions(dtype="float32", embedding_quant="int8"),
                           progress=False)
    a, b = LLM(engine), LLM(rebuilt)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    assert [o.token_ids for o in a.generate(PROMPTS, params)] == [o.token_ids for o in b.generate(PROMPTS, params)]
    ids = a.tokenizer(PROMPTS[0]).input_ids
    assert torch.equal(a.engine.score(ids), b.engine.score(ids))


def test_gate_failure_refuses_the_engine_unless_forced(quant_checkpoint: Path, tmp_path: Path) -> None:
    opts = BuildOptions(dtype="float32", quantization="int4_awq", calib_size=2, accuracy_budget=1.0)
    with pytest.raises(BuildError, match=r"accuracy gate FAIL \(int4_awq\): ppl .* budget 1.00.*--force"):
        build_engine(quant_checkpoint, tmp_path / "int4", opts, progress=False)
    assert not (tmp_path / "int4").exists()
    assert not any(p.name.startswith("kiln-quant-") for p in tmp_path.iterdir())  # nothing left behind

    forced = BuildOptions(dtype="float32", quantization="int4_awq", calib_size=2, accuracy_budget=1.0, force=True)
    engine = build_engine(quant_checkpoint, tmp_path / "int4", forced, progress=False)
    report = json.loads((engine / "build_report.json").read_text())
    assert report["accuracy"]["passed"] is False and report["accuracy"]["ppl_ratio"] > 1.0
    assert report["calibration"]["forced"] is True
    assert json.loads((engine / "config.json").read_text())["build"]["quantization"]["algo"] == "int4_awq"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(quantization="int8_wo", group_size=64), "--group-size applies only to --int4-awq"),
        (dict(quantization="int4_awq", group_size=48), "--group-size must be a positive multiple of 32"),
        (dict(calib_data="x.txt"), "--calib-data needs a weight quantization"),
        (dict(export_hf="out"), "--export-hf needs a weight quantization"),
        (dict(quantization="fp8", accuracy_budget=0.5), "--accuracy-budget is a perplexity ratio >= 1.0"),
        (dict(kv_cache_dtype="int4"), "--kv-cache-dtype 'int4' is not one of"),
        (dict(quantization="fp8", calib_size=0), "--calib-size must be a positive integer"),
    ],
)
def test_bad_option_combinations(options: dict, message: str) -> None:
    with pytest.raises(BuildError, match=message):
        BuildOptions(**options)


def test_bad_inputs_are_clear_errors(quant_checkpoint: Path, quantized, tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="already a ModelOpt-quantized checkpoint"):
        build_engine(quantized("int8_wo").export_dir, tmp_path / "e", BuildOptions(quantization="fp8"), progress=False)
    with pytest.raises(CheckpointError, match="calibration data file not found"):
        build_engine(quant_checkpoint, tmp_path / "e", BuildOptions(quantization="fp8", calib_data=str(tmp_path / "no.txt")),
                     progress=False)
    bad = tmp_path / "calib.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": 1}\n')
    with pytest.raises(CheckpointError, match=r"calib.jsonl:2: expected an object with a \"text\" string"):
        build_engine(quant_checkpoint, tmp_path / "e", BuildOptions(quantization="fp8", calib_data=str(bad)),
                     progress=False)
    with pytest.raises(BuildError, match="--group-size 256 does not divide"):
        build_engine(quant_checkpoint, tmp_path / "e", BuildOptions(quantization="int4_awq", group_size=256),
                     progress=False)


def test_cli_weight_flags_are_mutually_exclusive(quant_checkpoint: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cli.build_engine", str(quant_checkpoint), "-o", str(tmp_path / "e"), "--fp8", "--int8"],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[3],
    )
    assert result.returncode != 0
    assert "mutually exclusive" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "e").exists()


def test_gate_fits_a_short_engine(quant_checkpoint: Path, tmp_path: Path) -> None:
    """The gate's windows shrink to the engine's --max-seq-len; too short for any window is an error."""
    engine = build_engine(quant_checkpoint, tmp_path / "short", progress=False,
                          options=BuildOptions(dtype="float32", quantization="int8_wo", calib_size=2, max_seq_len=64))
    acc = json.loads((engine / "build_report.json").read_text())["accuracy"]
    assert acc["passed"] and acc["num_tokens"] > 1500  # as many held-out tokens as the default, in shorter windows
    with pytest.raises(BuildError, match="--max-seq-len 40 is too short for the accuracy gate"):
        build_engine(quant_checkpoint, tmp_path / "shorter", progress=False,
                     options=BuildOptions(dtype="float32", quantization="int8_wo", calib_size=2, max_seq_len=40))
