"""Write a safetensors file one tensor at a time, so a build never holds the whole model.

`safetensors.torch.save_file` needs every tensor in memory at once. `SafetensorsWriter` instead
appends each tensor's bytes to a scratch file next to the target as it arrives, and `close()`
writes the header (which must precede the data and name every tensor) followed by the data.
The result is a standard safetensors file that `safe_open` memory-maps.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from types import TracebackType

import torch

# torch dtype -> safetensors dtype tag
_DTYPE_TAGS: dict[torch.dtype, str] = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


class SafetensorsWriter:
    """Append tensors with `add(name, tensor)`; `close()` produces `path`. Names must be unique."""

    def __init__(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.metadata = dict(metadata or {"format": "pt"})
        self._data_path = self.path.with_name(self.path.name + ".data")
        self._data = self._data_path.open("wb")
        self._header: dict[str, dict[str, object]] = {}
        self._offset = 0
        self.num_parameters = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._header:
            raise ValueError(f"tensor {name!r} written twice")
        tag = _DTYPE_TAGS.get(tensor.dtype)
        if tag is None:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} has no safetensors encoding")
        raw = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()  # (nbytes,)
        self._data.write(raw.data)  # no copy: raw is a contiguous view of the tensor
        end = self._offset + raw.nbytes
        self._header[name] = {"dtype": tag, "shape": list(tensor.shape), "data_offsets": [self._offset, end]}
        self._offset = end
        self.num_parameters += tensor.numel()

    @property
    def num_bytes(self) -> int:
        return self._offset

    def close(self) -> None:
        """Write header + data to `path` and remove the scratch file."""
        self._data.close()
        header = json.dumps({"__metadata__": self.metadata, **self._header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # safetensors aligns the data start to 8 bytes
        with self.path.open("wb") as out, self._data_path.open("rb") as data:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            shutil.copyfileobj(data, out, length=1 << 24)
        self._data_path.unlink()

    def abort(self) -> None:
        self._data.close()
        self._data_path.unlink(missing_ok=True)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
