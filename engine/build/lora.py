"""Fold a PEFT LoRA adapter into a Hugging Face checkpoint: W' = W + (alpha / r) * B @ A.

`merge_lora(base, adapter, out)` writes a plain HF checkpoint (config, safetensors weights,
tokenizer and generation files copied from the base) that any loader, `build-engine` included,
takes like the original. The merge runs in fp32 and the result is saved in the base's dtype.
`out/kiln_merge.json` records what was merged (for the engine's `source.adapters`).

peft is imported lazily: it is only needed when an adapter is actually merged.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from engine.errors import CheckpointError

MERGE_RECORD = "kiln_merge.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Files of a checkpoint that describe text, not weights: copied verbatim into the merged one.
_TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                       "*.model", "*.tiktoken", "chat_template*", "generation_config.json")


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """The adapter's `adapter_config.json`, after checking the adapter is complete and safetensors."""
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{adapter_dir}: not a PEFT adapter (no adapter_config.json)")
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        pickled = (adapter_dir / "adapter_model.bin").is_file()
        raise CheckpointError(
            f"{adapter_dir}: no {ADAPTER_WEIGHTS}"
            + (" (only adapter_model.bin, a pickle, which Kiln does not load; re-save with safetensors)"
               if pickled else "")
        )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path}: invalid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object")
    return config


def merge_lora(base_ckpt: Path, adapter_dir: Path, out_dir: Path) -> Path:
    """Merge the LoRA adapter in `adapter_dir` into `base_ckpt`, write the result to `out_dir`.

    `out_dir` must not exist or be empty. Raises CheckpointError naming the file at fault when
    the base or the adapter is unusable (not LoRA, shapes that do not fit the base, ...).
    Returns `out_dir`.
    """
    base_ckpt, adapter_dir, out_dir = Path(base_ckpt), Path(adapter_dir), Path(out_dir)
    if not (base_ckpt / "config.json").is_file():
        raise CheckpointError(f"{base_ckpt}: not a Hugging Face checkpoint directory (no config.json)")
    adapter_config = read_adapter_config(adapter_dir)
    peft_type = adapter_config.get("peft_type")
    if peft_type != "LORA":
        raise CheckpointError(
            f"{adapter_dir}: adapter is {peft_type}, only LORA adapters can be merged into weights"
            + (" (serve prompt-tuning / p-tuning adapters as virtual tokens instead)"
               if peft_type in ("PROMPT_TUNING", "P_TUNING") else "")
        )
    if out_dir.resolve() in (base_ckpt.resolve(), adapter_dir.resolve()):
        raise CheckpointError(f"{out_dir}: the merged checkpoint must go to a new directory")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CheckpointError(f"{out_dir}: exists and is not an empty directory")

    import torch
    import transformers

    try:
        from peft import PeftModel
    except ImportError:
        raise CheckpointError("merging a LoRA adapter needs `peft`: pip install 'kiln-llm[train]'") from None

    try:
        base = transformers.AutoModelForCausalLM.from_pretrained(base_ckpt, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{base_ckpt}: transformers cannot load it: {exc}") from None
    saved_dtype = _stored_dtype(base.config)
    try:
        model = PeftModel.from_pretrained(base, adapter_dir)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{adapter_dir}: adapter does not fit {base_ckpt}: {_first_line(exc)}") from None
    merged = model.merge_and_unload().to(saved_dtype)

    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir)
    for pattern in _TOKENIZER_PATTERNS:
        for src in base_ckpt.glob(pattern):
            if src.is_file():
                shutil.copy2(src, out_dir / src.name)
    record = {
        "base": str(base_ckpt),
        "adapters": [{
            "path": str(adapter_dir),
            "peft_type": peft_type,
            "sha256": _sha256(adapter_dir / ADAPTER_WEIGHTS),
            "r": adapter_config.get("r"),
            "lora_alpha": adapter_config.get("lora_alpha"),
            "target_modules": adapter_config.get("target_modules"),
        }],
    }
    (out_dir / MERGE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return out_dir


def _stored_dtype(config: Any) -> Any:
    import torch

    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _first_line(exc: BaseException) -> str:
    """The informative line of a (often multi-line) torch/peft loading error."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "size mismatch" in line:
            return line
    return lines[0] if lines else type(exc).__name__


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
