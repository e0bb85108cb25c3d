"""Fixtures for serving tests: a tiny engine built once per session, and Triton servers that
are always stopped (and their processes gone) when the module that started them ends."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from serving.triton.launcher import TritonServer
from serving.triton.repository import RepoOptions, write_model_repository

# Small limits keep the KV pool tiny and make "prompt longer than max_seq_len" cheap to send.
TINY_ENGINE_MAX_SEQ_LEN = 256
TINY_ENGINE_MAX_BATCH_SIZE = 48


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float32 Kiln engine built from the tiny llama-gqa checkpoint."""
    from engine.build.builder import BuildOptions, build_engine

    out = tmp_path_factory.mktemp("engines") / "tiny-llama"
    options = BuildOptions(dtype="float32", max_batch_size=TINY_ENGINE_MAX_BATCH_SIZE,
                           max_seq_len=TINY_ENGINE_MAX_SEQ_LEN)
    return build_engine(tiny_checkpoint("llama-gqa"), out, options, progress=False)


def _process_gone(pid: int) -> bool:
    """True when no process `pid` exists (a zombie counts as gone: it runs nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _group_pids(pgid: int) -> list[int]:
    """Live processes of a process group, from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


@pytest.fixture(scope="session")
def process_gone() -> Callable[[int], bool]:
    """`process_gone(pid)`: no such process (or only its zombie) — checked through /proc, not psutil."""
    return _process_gone


@pytest.fixture(scope="session")
def group_pids() -> Callable[[int], list[int]]:
    """`group_pids(pgid)`: live processes of a process group (a server and its python stubs)."""
    return _group_pids


@pytest.fixture(scope="module")
def triton_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., TritonServer]]:
    """`triton_factory(engine_dir, **repo_options)` -> a ready TritonServer; all stopped at module end."""
    servers: list[TritonServer] = []

    def start(engine_dir: Path, **repo_options: object) -> TritonServer:
        repo = tmp_path_factory.mktemp("repo")
        write_model_repository(engine_dir, repo, RepoOptions(**repo_options))  # type: ignore[arg-type]
        server = TritonServer(repo)
        servers.append(server)
        server.start()
        server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()
