"""Fixtures for benchmark tests: a tiny engine and one real Triton server per module."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def bench_engine(tiny_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float32 Kiln engine of the tiny llama-gqa checkpoint (its source.checkpoint points there)."""
    from engine.build.builder import BuildOptions, build_engine

    out = tmp_path_factory.mktemp("bench-engine") / "tiny-llama"
    return build_engine(tiny_checkpoint("llama-gqa"), out,
                        BuildOptions(dtype="float32", max_batch_size=32, max_seq_len=256), progress=False)


@pytest.fixture(scope="module")
def triton_server(bench_engine: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real tritonserver serving the tiny engine as model `ensemble` on free loopback ports."""
    from serving.triton.launcher import TritonServer
    from serving.triton.repository import RepoOptions, write_model_repository

    repo = tmp_path_factory.mktemp("bench-repo")
    write_model_repository(bench_engine, repo, RepoOptions())
    server = TritonServer(repo)
    try:
        server.start()
        server.wait_ready()
        yield server
    finally:
        server.stop()
