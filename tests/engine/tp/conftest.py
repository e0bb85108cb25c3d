"""Tensor-parallel fixtures: tiny engines built once per session for each (kind, tp), and a
/proc-based check that processes are gone."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

TP_MAX_SEQ_LEN = 256


def _process_gone(pid: int) -> bool:
    """No process `pid`, or only its zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _child_pids(parent: int) -> list[int]:
    """Live (non-zombie) children of `parent`, from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent and fields[0] != "Z":
            pids.append(int(entry))
    return pids


@pytest.fixture(scope="session")
def process_gone() -> Callable[[int], bool]:
    return _process_gone


@pytest.fixture(scope="session")
def child_pids() -> Callable[[int], list[int]]:
    """`child_pids(pid)`: live child processes of `pid` (a tensor-parallel engine's workers)."""
    return _child_pids


@pytest.fixture(scope="session")
def tp_engine(tiny_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`tp_engine("llama-gqa", 2)` -> a float32 engine built with --tp 2 (cached per session)."""
    from engine.build.builder import BuildOptions, build_engine

    cache: dict[tuple[str, int], Path] = {}

    def make(kind: str, tp: int) -> Path:
        if (kind, tp) not in cache:
            out = tmp_path_factory.mktemp(f"engine-{kind}-tp{tp}") / "engine"
            options = BuildOptions(dtype="float32", tp_size=tp, max_seq_len=TP_MAX_SEQ_LEN, max_batch_size=8)
            cache[kind, tp] = Path(build_engine(tiny_checkpoint(kind), out, options, progress=False))
        return cache[kind, tp]

    return make
