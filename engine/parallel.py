"""Tensor-parallel state of this process, set once and read through accessors.

With tp_size == 1 (the default) no collective is ever called, so single-process engines
need no `torch.distributed` initialisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ParallelState:
    tp_rank: int = 0
    tp_size: int = 1


_state = ParallelState()


def set_parallel_state(tp_rank: int, tp_size: int) -> None:
    global _state
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} out of range for tp_size {tp_size}")
    _state = ParallelState(tp_rank, tp_size)


def get_tp_rank() -> int:
    return _state.tp_rank


def get_tp_size() -> int:
    return _state.tp_size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _state.tp_size > 1:
        torch.distributed.all_reduce(x)
    return x


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of `x` over the ranks, in place (e.g. a row-parallel layer's per-token
    activation amax, so every rank quantizes its input slice with the whole row's scale)."""
    if _state.tp_size > 1:
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's `x` along the last dimension (equal sizes on every rank)."""
    if _state.tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_state.tp_size)]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)
