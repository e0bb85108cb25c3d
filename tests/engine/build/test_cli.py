"""The real `build-engine` and `kiln convert` console scripts, run as users run them."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_build_engine_prints_path_and_summary(tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    result = run(BIN / "build-engine", tiny_checkpoint("qwen3"), "-o", tmp_path / "e", "--dtype", "float16",
                 "--max-batch-size", "4", "--max-seq-len", "128", "--max-num-tokens", "256", "--kv-block-size", "8", "-q")
    assert result.returncode == 0, result.stderr
    assert f"engine: {tmp_path / 'e'}" in result.stdout and "qwen3" in result.stdout and "float16" in result.stdout
    build = json.loads((tmp_path / "e" / "config.json").read_text())["build"]
    assert (build["max_batch_size"], build["max_seq_len"], build["max_num_tokens"], build["kv_block_size"]) == (
        4, 128, 256, 8)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{tmp}/absent"], "error: {tmp}/absent: no such file or directory"),
        (["{ckpt}", "--dtype", "int3"], "error: --dtype 'int3' is not one of"),
        (["{ckpt}", "--max-seq-len", "99999"], "error: --max-seq-len 99999 exceeds the model's context of 512"),
        (["{tmp}", "-o", "{tmp}/x"], "error: {tmp}/config.json: missing"),
    ],
)
def test_build_engine_errors_are_one_line(
    args: list[str], message: str, tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    fill = {"tmp": str(tmp_path), "ckpt": str(tiny_checkpoint("llama-gqa"))}
    result = run(BIN / "build-engine", *[a.format(**fill) for a in args], "-o", tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message.format(**fill)), result.stderr
    assert "Traceback" not in result.stderr


def test_kiln_convert_writes_a_checkpoint_that_builds(
    tiny_checkpoint: Callable[..., Path], write_gguf: Callable[..., Path], tmp_path: Path
) -> None:
    gguf_path = write_gguf(tiny_checkpoint("llama-gqa"), tmp_path / "m.gguf")
    result = run(BIN / "kiln", "convert", gguf_path, "-o", tmp_path / "ckpt", "-q")
    assert result.returncode == 0, result.stderr
    assert f"checkpoint: {tmp_path / 'ckpt'}" in result.stdout
    expected = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "chat_template.jinja"}
    assert expected <= {p.name for p in (tmp_path / "ckpt").iterdir()}
    again = run(BIN / "kiln", "convert", gguf_path, "-o", tmp_path / "ckpt")
    assert again.returncode == 2 and again.stderr.startswith(f"error: {tmp_path / 'ckpt'}: exists and is not an empty")
