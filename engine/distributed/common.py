"""What rank 0 and the workers agree on: store keys, the setup record, timeouts, device choice."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from engine.config import EngineConfig
from engine.errors import KilnError

SETUP_KEY = "kiln/setup"
PG_PREFIX = "kiln/pg"


def ready_key(rank: int) -> str:
    return f"kiln/ready/{rank}"


def error_key(rank: int) -> str:
    return f"kiln/error/{rank}"


class TensorParallelError(KilnError):
    """A tensor-parallel worker failed to start, died, or a collective failed or timed out.
    The engine is unusable afterwards; its other workers have been shut down."""


@dataclass(frozen=True)
class WorkerSetup:
    """Everything a worker needs besides its rank (published by rank 0 in the store)."""

    engine_dir: str
    config: EngineConfig  # with run-time overrides applied
    device_type: str  # "cpu" | "cuda"
    dtype: torch.dtype
    num_kv_blocks: int
    collective_timeout_s: float


def env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise TensorParallelError(f"environment variable {name}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise TensorParallelError(f"environment variable {name}={raw!r} must be positive")
    return value


# Rank 0 may sit idle between requests for any time; the batch channel must not time out then.
CONTROL_TIMEOUT = timedelta(days=7)


def backend_for(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def worker_device(device_type: str, rank: int) -> torch.device:
    """One GPU per rank: LOCAL_RANK when set (multi-node), else the global rank."""
    if device_type != "cuda":
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", rank))
    return torch.device("cuda", local % max(1, torch.cuda.device_count()))
