"""Read a Hugging Face checkpoint directory tensor by tensor, memory-mapped, never all at once.

A checkpoint directory holds `config.json` and either one `model.safetensors` or a sharded set
described by `model.safetensors.index.json` (`{"weight_map": {tensor name: shard file}}`).
Only safetensors are read: pickle files (`pytorch_model.bin`) can run code when loaded, so a
pickle-only checkpoint is refused with a message saying how to convert it.

Every problem raises `CheckpointError` naming the file or tensor at fault.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import safe_open

from engine.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "consolidated.00.pth")


def read_json(path: Path, required: bool = True) -> dict[str, Any] | None:
    """Decode a JSON object from `path`; None when absent and not `required`."""
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path}: missing")
        return None
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


class HFCheckpoint:
    """A Hugging Face checkpoint directory opened for reading.

    `get(name)` returns one tensor, read from its memory-mapped shard; only that tensor is
    materialized. Use as a context manager (or call `close()`) to release the shard handles.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory (expected a Hugging Face checkpoint)")
        config = read_json(self.path / "config.json", required=False)
        if config is None:
            raise CheckpointError(
                f"{self.path / 'config.json'}: missing (is {self.path} a Hugging Face checkpoint directory?)"
            )
        self.config: dict[str, Any] = config
        self.generation_config: dict[str, Any] | None = read_json(
            self.path / "generation_config.json", required=False
        )
        self._handles: dict[str, Any] = {}
        self.weight_map: dict[str, str] = self._read_weight_map()

    def _read_weight_map(self) -> dict[str, str]:
        """Tensor name -> shard file name, checking that every shard exists."""
        index_path = self.path / INDEX_FILE
        single_path = self.path / SINGLE_FILE
        if index_path.is_file():
            index = read_json(index_path)
            assert index is not None
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path}: has no 'weight_map' object naming the shards")
            for shard in sorted(set(weight_map.values())):
                if not (self.path / shard).is_file():
                    raise CheckpointError(f"{self.path / shard}: shard listed in {INDEX_FILE} is missing")
            return {str(k): str(v) for k, v in weight_map.items()}
        if single_path.is_file():
            return {name: SINGLE_FILE for name in self._open(SINGLE_FILE).keys()}
        pickles = [name for name in PICKLE_FILES if (self.path / name).exists()]
        if pickles:
            raise CheckpointError(
                f"{self.path / pickles[0]}: pickle checkpoints are not read by Kiln (they can run code when "
                "loaded); convert it to safetensors first, e.g. "
                "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`"
            )
        others = sorted(p.name for p in self.path.glob("*.safetensors"))
        if others:
            raise CheckpointError(
                f"{self.path}: has {others} but neither {SINGLE_FILE} nor {INDEX_FILE} naming the shards"
            )
        raise CheckpointError(f"{self.path}: no weights found (expected {SINGLE_FILE} or {INDEX_FILE})")

    def _open(self, shard: str) -> Any:
        handle = self._handles.get(shard)
        if handle is None:
            try:
                handle = safe_open(str(self.path / shard), framework="pt")
            except Exception as exc:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(f"{self.path / shard}: not a readable safetensors file ({exc})") from None
            self._handles[shard] = handle
        return handle

    def tensor_names(self) -> list[str]:
        return sorted(self.weight_map)

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self._shard_of(name)).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor (in its stored dtype) from its memory-mapped shard."""
        shard = self._shard_of(name)
        try:
            return self._open(shard).get_tensor(name)
        except Exception as exc:
            raise CheckpointError(f"{self.path / shard}: cannot read tensor {name!r} ({exc})") from None

    def _shard_of(self, name: str) -> str:
        shard = self.weight_map.get(name)
        if shard is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        return shard

    def files(self) -> list[Path]:
        """The checkpoint files a build reads (for content hashes in the engine's `source`)."""
        names = {"config.json", "generation_config.json", INDEX_FILE, *self.weight_map.values()}
        return sorted(self.path / n for n in names if (self.path / n).is_file())

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> HFCheckpoint:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
