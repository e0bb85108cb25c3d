"""cli/train.py: `kiln finetune` and `kiln merge` through the real `kiln` Typer app."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cli.errors import run_cli
from cli.main import app


def test_kiln_finetune_then_kiln_merge(tiny_checkpoint, kv_task, tmp_path):
    out = tmp_path / "adapter"
    result = CliRunner().invoke(app, [
        "finetune", "--model", str(tiny_checkpoint("llama-gqa")), "--data", str(kv_task.train),
        "--val-data", str(kv_task.val), "--template", kv_task.template, "--method", "lora", "--rank", "4",
        "--epochs", "1", "--batch-size", "16", "--lr", "1e-3", "--exact-match-samples", "8", "-o", str(out),
    ])
    assert result.exit_code == 0, result.output
    assert "val exact match:" in result.output and "tokens/s" in result.output
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4

    merged = tmp_path / "merged"
    result = CliRunner().invoke(app, ["merge", str(tiny_checkpoint("llama-gqa")), str(out), "-o", str(merged)])
    assert result.exit_code == 0, result.output
    assert (merged / "model.safetensors").is_file() and (merged / "kiln_merge.json").is_file()


def test_bad_records_with_strict_are_one_line_error_naming_the_lines(tiny_checkpoint, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "q", "answer": "a"}\n{"question": "q"\n{"answer": "a"}\n')
    argv = ["finetune", "--model", str(tiny_checkpoint("llama-gqa")), "--data", str(data), "--strict",
            "--template", "Question: {question} Answer: {answer}", "-o", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(app, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"--data {data}: 2 bad record(s): line 2: invalid JSON" in " ".join(err.split())
    assert "line 3: missing field(s) question" in " ".join(err.split())


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--method", "dpo"], "--method 'dpo' is not one of lora, full, prompt-tuning, p-tuning"),
        (["--rank", "0"], "--rank must be a positive integer"),
        (["--template", "no placeholders"], "has no {field} placeholder"),
    ],
)
def test_bad_flags_are_one_line_errors(tiny_checkpoint, kv_task, tmp_path, capsys, flags, message):
    argv = ["finetune", "--model", str(tiny_checkpoint("llama-gqa")), "--data", str(kv_task.train),
            "--template", kv_task.template, "-o", str(tmp_path / "out"), *flags]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(app, argv)
    assert exit_info.value.code == 2
    assert message in " ".join(capsys.readouterr().err.split())


def test_merge_of_a_missing_adapter_is_a_one_line_error(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(app, ["merge", str(tiny_checkpoint("llama-gqa")), str(tmp_path / "nope"), "-o", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "not a PEFT adapter (no adapter_config.json)" in " ".join(capsys.readouterr().err.split())
