"""SafetensorsWriter streams tensors into a standard safetensors file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from engine.build.writer import SafetensorsWriter


def test_written_file_reads_back_exactly(tmp_path: Path) -> None:
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int8).reshape(2, 3),
        "d": torch.randn(2, 2).to(torch.float16).t(),  # non-contiguous
        "e": torch.ones(1, dtype=torch.float32)[:0],  # empty
    }
    with SafetensorsWriter(tmp_path / "w.safetensors", {"format": "pt", "who": "kiln"}) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
    assert writer.num_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "who": "kiln"}
        for name, tensor in tensors.items():
            assert torch.equal(f.get_tensor(name), tensor), name
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # scratch file removed


def test_duplicate_name_and_failed_write_leave_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="written twice"), SafetensorsWriter(tmp_path / "x.safetensors") as w:
        w.add("a", torch.zeros(2))
        w.add("a", torch.zeros(2))
    assert list(tmp_path.iterdir()) == []
