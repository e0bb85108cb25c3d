"""Tensor-parallel fixtures: tiny engines built once per session for each (kind, tp) (the /proc
process checks are in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

TP_MAX_SEQ_LEN = 256


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
