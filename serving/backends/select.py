"""`--backend auto|kiln|vllm|hf`: which backend serves a path, and why.

auto: `kiln` for a Kiln engine, a .gguf file, or a checkpoint whose architecture Kiln builds
(`engine.build.transforms.HF_ARCHITECTURES`); else `vllm` when its environment is installed
(`make vllm` -> .venv-vllm, or $KILN_VLLM_PYTHON; "" turns vLLM off) and registers the
architecture; else `hf` when transformers knows it. An explicit choice that
cannot run the model is a BackendError naming the reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from engine.config import is_engine_dir
from engine.errors import EngineLoadError
from serving.backends.base import CHOICES, BackendChoice, BackendError


def checkpoint_architecture(path: Path) -> str:
    """`architectures[0]` of a Hugging Face checkpoint's config.json (BackendError if unreadable)."""
    config = path / "config.json"
    try:
        archs = json.loads(config.read_text()).get("architectures") or []
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BackendError(f"{config}: cannot read the model architecture ({exc})") from None
    if not archs or not isinstance(archs[0], str):
        raise BackendError(f"{config}: no 'architectures' entry; cannot tell which backend can run it")
    return archs[0]


def vllm_supports(architecture: str) -> tuple[bool, str]:
    """(True, "") when vLLM is installed (`make vllm`, or $KILN_VLLM_PYTHON) and registers `architecture`."""
    from serving.backends.vllm import vllm_architectures, vllm_python

    python = vllm_python()
    if python is None:
        return False, "vLLM is not installed (make vllm)"
    if architecture not in _cached_architectures(python, vllm_architectures):
        return False, f"vLLM does not support {architecture}"
    return True, ""


_ARCHS: dict[Path, frozenset[str]] = {}


def _cached_architectures(python: Path, query: Callable[[Path], frozenset[str]]) -> frozenset[str]:
    if python not in _ARCHS:
        _ARCHS[python] = query(python)
    return _ARCHS[python]


def transformers_supports(architecture: str) -> bool:
    import transformers

    return hasattr(transformers, architecture)


def choose_backend(path: str | Path, requested: str = "auto") -> BackendChoice:
    """The backend for `path` (engine dir, .gguf file or checkpoint dir) given `--backend requested`."""
    if requested not in CHOICES:
        raise BackendError(f"--backend {requested!r}: choose one of {', '.join(CHOICES)}")
    path = Path(path)
    if is_engine_dir(path) or path.suffix == ".gguf":
        what = "a Kiln engine" if path.is_dir() else "a GGUF file"
        if requested not in ("auto", "kiln"):
            raise BackendError(
                f"--backend {requested}: {path} is {what}, which only the kiln backend runs; "
                "pass the Hugging Face checkpoint directory instead, or --backend kiln")
        if not path.exists():
            raise BackendError(f"{path}: no such file")
        return BackendChoice("kiln", f"{path} is {what}")
    if not (path / "config.json").is_file():
        raise EngineLoadError(f"{path}: neither a Kiln engine nor a Hugging Face checkpoint (no config.json)")
    from engine.build.transforms import HF_ARCHITECTURES  # imports torch: only when needed

    arch = checkpoint_architecture(path)
    native = arch in HF_ARCHITECTURES
    if requested == "kiln" or (requested == "auto" and native):
        if not native:
            raise BackendError(
                f"--backend kiln: Kiln does not run {arch} natively (it builds {', '.join(sorted(HF_ARCHITECTURES))}); "
                "use --backend auto, hf or vllm")
        return BackendChoice("kiln", f"Kiln runs {arch} natively")
    vllm_ok, vllm_why = vllm_supports(arch) if requested in ("auto", "vllm") else (False, "")
    if requested == "vllm":
        if not vllm_ok:
            raise BackendError(f"--backend vllm: {vllm_why}; use --backend auto or hf")
        return BackendChoice("vllm", f"requested; vLLM supports {arch}")
    if requested == "auto" and vllm_ok:
        return BackendChoice("vllm", f"Kiln does not run {arch} natively; vLLM supports it")
    if not transformers_supports(arch):
        raise BackendError(f"{path}: transformers does not know the architecture {arch}; no backend can run it")
    if requested == "hf":
        return BackendChoice("hf", f"requested; transformers supports {arch}")
    return BackendChoice("hf", f"Kiln does not run {arch} natively and {vllm_why}; using transformers")
