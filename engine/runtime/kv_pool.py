"""Sizing the paged KV pool, and saying why it got the size it has."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from engine.errors import InvalidRequestError
from engine.runtime.model_runner import KVCacheSpec

_MIB = 1 << 20
# On the CPU the pool shares RAM with everything else: take at most this share of what is free.
_CPU_MAX_FRACTION = 0.25
_GPU_MEMORY_UTILIZATION = 0.85


@dataclass(frozen=True)
class KVPoolPlan:
    num_blocks: int
    block_size: int
    bytes_per_block: int
    reason: str

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    def describe(self) -> str:
        return (f"{self.num_blocks} blocks x {self.block_size} tokens = {self.num_tokens} tokens, "
                f"{self.num_bytes / _MIB:.1f} MiB ({self.reason})")


def _available_ram() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 4 << 30


def plan_kv_pool(spec: KVCacheSpec, max_batch_size: int, max_seq_len: int, device: torch.device,
                 num_blocks: int | None = None, memory_bytes: int | None = None) -> KVPoolPlan:
    """Blocks for `max_batch_size` full-length sequences, unless memory says fewer."""
    per_block = spec.bytes_per_block
    bs = spec.block_size
    if num_blocks is not None:
        if num_blocks <= 0:
            raise InvalidRequestError(f"num_kv_blocks must be positive, got {num_blocks}")
        return KVPoolPlan(num_blocks, bs, per_block, "num_kv_blocks given")
    if memory_bytes is not None:
        n = memory_bytes // per_block
        if n <= 0:
            raise InvalidRequestError(f"kv cache memory {memory_bytes} bytes is smaller than one block ({per_block})")
        return KVPoolPlan(int(n), bs, per_block, f"kv cache memory {memory_bytes / _MIB:.0f} MiB given")
    wanted = max_batch_size * -(-max_seq_len // bs)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * _GPU_MEMORY_UTILIZATION)
        where = f"{_GPU_MEMORY_UTILIZATION:.0%} of free GPU memory"
    else:
        budget = int(_available_ram() * _CPU_MAX_FRACTION)
        where = f"{_CPU_MAX_FRACTION:.0%} of available RAM"
    if wanted * per_block <= budget:
        return KVPoolPlan(wanted, bs, per_block, f"max_batch_size {max_batch_size} x max_seq_len {max_seq_len}")
    n = budget // per_block
    if n * bs < max_seq_len:
        raise InvalidRequestError(
            f"KV cache budget ({where}, {budget / _MIB:.0f} MiB) cannot hold one sequence of max_seq_len "
            f"{max_seq_len}; lower max_seq_len or pass kv cache memory explicitly"
        )
    return KVPoolPlan(int(n), bs, per_block, f"capped at {where}")
