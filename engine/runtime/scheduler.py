"""Which tokens of which requests run in the next step.

Each step fills a token budget (`max_num_tokens`): running requests first (decodes, and the
next chunk of prompts already being prefilled), then new requests from the waiting queue,
whose prompts may be split into chunks (chunked prefill). When the KV pool runs out, the
newest running request is preempted: its blocks are freed and it returns to the front of the
waiting queue, to be recomputed later (prompt + what it generated so far), instead of failing.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from engine.runtime.block_manager import BlockManager
from engine.runtime.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_tokens: int
    max_seq_len: int
    enable_chunked_prefill: bool = True


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """True when this step computes the sequence's last known token, so it must sample."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # ---- requests in and out -----------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def find(self, request_id: str) -> Sequence | None:
        for seq in self.running:
            if seq.request_id == request_id:
                return seq
        for seq in self.waiting:
            if seq.request_id == request_id:
                return seq
        return None

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """Mark `seq` finished with `status` and release its KV blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = status
        self.block_manager.free(seq)

    # ---- the step ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Choose this step's work. Guarantees: total tokens <= max_num_tokens, running
        sequences <= max_num_seqs, and every scheduled token has a KV slot allocated."""
        out = SchedulerOutput()
        budget = self.config.max_num_tokens

        # 1. Running requests (decodes and ongoing chunked prefills), oldest first.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_uncomputed_tokens, budget)
            while not self.block_manager.allocate_slots(seq, num_new):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                break  # seq preempted itself: nothing newer is left to run
            out.scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
            i += 1

        # 2. Waiting requests, in arrival order, unless this step had to preempt.
        while self.waiting and budget > 0 and not out.preempted:
            if len(self.running) >= self.config.max_num_seqs:
                break
            seq = self.waiting[0]
            if not seq.block_table:
                cached = self.block_manager.find_cached_prefix(seq)
                if not self.block_manager.can_allocate(
                    self.block_manager.blocks_needed(seq.num_tokens) - len(cached)
                ) and self.running:
                    break  # admit only requests whose whole context fits now; avoids thrashing
                self.block_manager.allocate_prefix(seq, cached)
                seq.num_cached_tokens = seq.num_computed_tokens if not seq.num_preemptions else seq.num_cached_tokens
            num_new = seq.num_uncomputed_tokens
            if num_new > budget:
                if not self.config.enable_chunked_prefill:
                    break
                num_new = budget
            if not self.block_manager.allocate_slots(seq, num_new):
                if not self.running:
                    # Nothing to wait for: the request can never fit into this KV pool.
                    raise RuntimeError(
                        f"request {seq.request_id} needs more KV blocks than the pool has "
                        f"({self.block_manager.num_blocks})"
                    )
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            out.scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
        return out

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        out.scheduled = [s for s in out.scheduled if s.seq is not seq]

    def check_integrity(self) -> None:
        live = self.running + [s for s in self.waiting if s.block_table]
        self.block_manager.check_integrity(live)
        assert len(self.running) <= self.config.max_num_seqs
