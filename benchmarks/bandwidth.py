"""This machine's memory bandwidth, and the decode roofline it implies (MBU).

Decode of one step reads every weight once (whatever the batch), so steps/s can be no more
than bandwidth / weight bytes. Model bandwidth utilization is the fraction of that reached:

    MBU = weight bytes read per decode step × decode steps/s ÷ measured bandwidth

Bandwidth is measured as a STREAM-style copy of a tensor much larger than the caches:
each copy reads N bytes and writes N bytes, so it moves 2N (write-allocate traffic, which
some CPUs add on top, is not counted, as in STREAM). The best of several copies is reported.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from engine.config import ModelConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Bandwidth:
    """Measured copy bandwidth of one device."""

    device: str
    gb_per_s: float  # 1e9 bytes per second, read + write
    buffer_bytes: int
    iters: int
    threads: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_copy_bandwidth(device: str = "cpu", buffer_bytes: int = 256 * 2**20, iters: int = 8) -> Bandwidth:
    """Copy a `buffer_bytes` tensor into another `iters` times; best rate, counting 2 × bytes."""
    import torch

    numel = buffer_bytes // 4
    src = torch.ones(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page faults are not bandwidth
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    best = float("inf")
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - start)
    moved = 2 * numel * 4
    del src, dst
    return Bandwidth(device=device, gb_per_s=moved / best / 1e9, buffer_bytes=numel * 4, iters=iters,
                     threads=torch.get_num_threads())


def weight_bytes_per_decode_step(model: ModelConfig, dtype: str) -> int:
    """Bytes of weights one decode step reads: every layer's projections and norms, the final
    norm and the LM head. The input embedding is not counted (a step gathers only one row per
    sequence); when embeddings are tied the shared matrix is counted once, as the LM head."""
    h, hd = model.hidden_size, model.head_dim
    qkv = h * (model.num_heads + 2 * model.num_kv_heads) * hd
    out = model.num_heads * hd * h
    mlp = 3 * h * model.intermediate_size
    norms = 2 * h + (2 * hd if model.qk_norm else 0)
    bias = (model.num_heads + 2 * model.num_kv_heads) * hd if model.qkv_bias else 0
    per_layer = qkv + out + mlp + norms + bias
    params = model.num_layers * per_layer + h + model.vocab_size * h
    return params * DTYPE_BYTES[dtype]


def kv_bytes_per_token(model: ModelConfig, dtype: str) -> int:
    """KV-cache bytes one token of context adds (and a decode step re-reads per token)."""
    return 2 * model.num_layers * model.num_kv_heads * model.head_dim * DTYPE_BYTES[dtype]


def mbu(weight_bytes: int, steps_per_s: float, bandwidth: Bandwidth) -> float:
    """Fraction of the measured bandwidth that reading the weights at this step rate uses."""
    return weight_bytes * steps_per_s / (bandwidth.gb_per_s * 1e9)
