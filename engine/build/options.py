"""`BuildOptions`: what a build was asked for, validated once (no torch import, so CLI flag
errors are instant)."""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import DTYPES
from engine.errors import BuildError


@dataclass(frozen=True)
class BuildOptions:
    """What `build-engine` was asked for. `None` limits are derived from the checkpoint:
    max_seq_len = min(max_position_embeddings, 4096), max_num_tokens = max(2048, max_seq_len)."""

    dtype: str = "auto"
    max_batch_size: int = 64
    max_seq_len: int | None = None
    max_num_tokens: int | None = None
    kv_block_size: int = 16
    tp_size: int = 1

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise BuildError(f"--dtype {self.dtype!r} is not one of {['auto', *DTYPES]}")
        for flag, value in (
            ("--max-batch-size", self.max_batch_size),
            ("--max-seq-len", self.max_seq_len),
            ("--max-num-tokens", self.max_num_tokens),
            ("--kv-block-size", self.kv_block_size),
            ("--tp", self.tp_size),
        ):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise BuildError(f"{flag} must be a positive integer, got {value!r}")
