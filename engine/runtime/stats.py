"""A snapshot of engine-wide counters, for metrics exporters and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    """Engine state after the most recent step.

    Counters (`total_*`, `prefix_cache_*`, `num_preemptions`, `num_steps`) only grow.
    `prefix_cache_queries` / `prefix_cache_hits` count prompt tokens looked up in / served
    from the prefix cache, so hits / queries is the token hit rate.
    """

    num_running: int
    num_waiting: int
    num_total_blocks: int
    num_free_blocks: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    num_steps: int
    last_batch_size: int
    last_num_tokens: int
    max_batch_size_seen: int
    total_prompt_tokens: int
    total_generation_tokens: int
