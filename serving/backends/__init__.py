"""Serving backends behind one interface (`serving.backends.base.Backend`), by name.

    choice = choose_backend(path, "auto")      # BackendChoice(name, reason)
    backend = open_backend(choice.name, path)  # add_request / abort / stats / shutdown

Registry: `kiln` (Kiln's engine), `vllm` (vLLM's server in its own venv), `hf` (transformers).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from serving.backends.base import BACKEND_NAMES, CHOICES, Backend, BackendChoice, BackendError, OutputCallback
from serving.backends.select import choose_backend


def _open_kiln(path: Path) -> Backend:
    from serving.backends.kiln import KilnBackend

    return KilnBackend(path)


def _open_vllm(path: Path) -> Backend:
    from serving.backends.vllm import VllmBackend

    return VllmBackend(path)


def _open_hf(path: Path) -> Backend:
    from serving.backends.hf import HFBackend

    return HFBackend(path)


BACKENDS: dict[str, Callable[[Path], Backend]] = {"kiln": _open_kiln, "vllm": _open_vllm, "hf": _open_hf}


def open_backend(name: str, path: str | Path, **_: Any) -> Backend:
    """Load the backend `name` for `path` (BackendError for an unknown or unavailable name)."""
    opener = BACKENDS.get(name)
    if opener is None:
        known = ", ".join(BACKENDS)
        raise BackendError(f"backend {name!r} is not available in this build of Kiln (available: {known})")
    return opener(Path(path))


__all__ = ["BACKENDS", "BACKEND_NAMES", "CHOICES", "Backend", "BackendChoice", "BackendError", "OutputCallback",
           "choose_backend", "open_backend"]
