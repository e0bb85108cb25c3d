"""GGUF (llama.cpp) -> Hugging Face checkpoint, so GGUF builds take the same path as any other.

`transformers` reads GGUF: it dequantizes every block type, undoes llama.cpp's rotary row
permutation of q_proj/k_proj, and rebuilds the tokenizer (with its chat template) from the file's
metadata. Kiln relies on it rather than re-implementing it, then writes a plain safetensors
checkpoint that `engine.build.checkpoint.HFCheckpoint` reads like any other.

The whole dequantized model is held in memory once (GGUF files are quantized; a 7B model
dequantized to float32 needs ~28 GB, use dtype="bfloat16" to halve that).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from engine.build.transforms import HF_ARCHITECTURES
from engine.build.writer import SafetensorsWriter
from engine.config import DTYPES
from engine.errors import CheckpointError

GGUF_MAGIC = b"GGUF"


def _check_gguf_file(path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise CheckpointError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")


@contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    """transformers shows tqdm bars while dequantizing; silence them when progress is off."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def convert_gguf(gguf_path: str | Path, output_dir: str | Path, dtype: str = "float32", progress: bool = True) -> Path:
    """Write the Hugging Face checkpoint equivalent to a llama-family GGUF file into `output_dir`.

    Produces config.json, model.safetensors (dequantized to `dtype`), generation_config.json and
    the tokenizer files (tokenizer.json, tokenizer_config.json, chat template). Raises
    CheckpointError for a file that is not GGUF, unreadable, or not a Kiln architecture.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(gguf_path)
    out = Path(output_dir)
    _check_gguf_file(path)
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not one of {list(DTYPES)}")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise CheckpointError(f"{out}: exists and is not empty; choose an empty or new output directory")
    folder, name = str(path.parent.resolve()), path.name
    with _transformers_progress(progress):
        try:
            config = AutoConfig.from_pretrained(folder, gguf_file=name)
        except Exception as exc:  # transformers raises ValueError/KeyError/... for files it cannot map
            raise CheckpointError(f"{path}: cannot read GGUF metadata ({exc})") from None
        archs = list(getattr(config, "architectures", None) or [])
        if not archs:
            archs = [f"{type(config).__name__.removesuffix('Config')}ForCausalLM"]
        if archs[0] not in HF_ARCHITECTURES:
            raise CheckpointError(
                f"{path}: GGUF architecture {archs[0]!r} is not supported; Kiln builds {sorted(HF_ARCHITECTURES)}"
            )
        try:
            model = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, config=config, dtype=getattr(torch, dtype)
            )
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot read GGUF tensors or tokenizer ({exc})") from None

    out.mkdir(parents=True, exist_ok=True)
    hf_config: dict[str, Any] = model.config.to_dict()
    hf_config.pop("quantization_config", None)  # the weights written below are plain floats
    hf_config["architectures"] = archs
    hf_config["dtype"] = dtype
    tied = bool(hf_config.get("tie_word_embeddings"))
    with SafetensorsWriter(out / "model.safetensors") as writer:
        for tensor_name, tensor in model.state_dict().items():
            if tied and tensor_name == "lm_head.weight":
                continue  # the same storage as embed_tokens; a HF checkpoint saves it once
            writer.add(tensor_name, tensor)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    model.generation_config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


@contextmanager
def gguf_as_hf_checkpoint(gguf_path: str | Path, progress: bool = True) -> Iterator[Path]:
    """Convert a GGUF file into a temporary HF checkpoint directory, removed on exit."""
    scratch = Path(tempfile.mkdtemp(prefix="kiln-gguf-"))
    try:
        yield convert_gguf(gguf_path, scratch / "checkpoint", dtype="float32", progress=progress)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
