"""Paged KV-cache bookkeeping: fixed-size blocks, reference counts, prefix caching.

A block is *free* (reference count 0, on the free list) or *in use* (reference count > 0,
not on the free list) — never both; `check_integrity()` asserts exactly that. A full block
whose K/V have been computed is registered under the hash of its token chain
(hash of the previous block's hash and its own token ids), so a later request whose
prompt starts with the same tokens reuses it instead of recomputing. Freed blocks keep
their hash until they are handed out again, so the prefix cache survives a request's end
and is evicted oldest-freed first.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.runtime.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] = field(default_factory=tuple)


def chain_hash(prev_hash: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((prev_hash, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be positive")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        self._free_set = set(range(num_blocks))
        self.hash_to_block_id: dict[int, int] = {}
        self.prefix_cache_queries = 0  # tokens looked up
        self.prefix_cache_hits = 0  # tokens found

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache ----------------------------------------------------------------------
    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids that already hold the K/V of `seq`'s leading full blocks.

        At least one token is always left to compute, because the step that computes a
        request's last known token is the one that produces logits for sampling.
        """
        if not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hits: list[int] = []
        prev_hash: int | None = seq.cache_salt
        for i in range(max_blocks):
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = chain_hash(prev_hash, tokens)
            block_id = self.hash_to_block_id.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
            prev_hash = h
        return hits

    def allocate_prefix(self, seq: Sequence, cached_block_ids: list[int]) -> None:
        """Give a sequence with an empty block table its cached prefix blocks."""
        if seq.block_table:
            raise RuntimeError(f"{seq.request_id}: allocate_prefix on a non-empty block table")
        for block_id in cached_block_ids:
            self._take(block_id)
        seq.block_table = list(cached_block_ids)
        seq.num_computed_tokens = len(cached_block_ids) * self.block_size
        self.prefix_cache_queries += seq.num_tokens
        self.prefix_cache_hits += seq.num_computed_tokens

    def register_full_blocks(self, seq: Sequence) -> None:
        """Hash the blocks of `seq` that are now full and computed, so others can reuse them."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        prev_hash: int | None = seq.cache_salt
        for i in range(num_full):
            block = self.blocks[seq.block_table[i]]
            if block.block_hash is not None:
                prev_hash = block.block_hash
                continue
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = chain_hash(prev_hash, tokens)
            block.block_hash = h
            block.token_ids = tokens
            # If an identical block exists already (computed concurrently), keep the first.
            self.hash_to_block_id.setdefault(h, block.block_id)
            prev_hash = h

    # ---- allocation ------------------------------------------------------------------------
    def num_new_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = self.blocks_needed(seq.num_computed_tokens + num_new_tokens)
        return max(0, total - len(seq.block_table))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow `seq`'s block table to hold `num_new_tokens` more tokens. False if out of blocks."""
        needed = self.num_new_blocks_needed(seq, num_new_tokens)
        if needed > self.num_free_blocks:
            return False
        for _ in range(needed):
            seq.block_table.append(self._take_free())
        return True

    def free(self, seq: Sequence) -> None:
        """Release all of `seq`'s blocks (in reverse, so a chain's tail is evicted first)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count < 0:
                raise RuntimeError(f"block {block_id} freed more often than allocated")
            if block.ref_count == 0:
                self.free_block_ids.append(block_id)
                self._free_set.add(block_id)
        seq.block_table = []
        seq.num_computed_tokens = 0

    def _take_free(self) -> int:
        block_id = self.free_block_ids.popleft()
        self._free_set.discard(block_id)
        block = self.blocks[block_id]
        if block.block_hash is not None:
            # Evict: this cached block is about to hold other tokens.
            if self.hash_to_block_id.get(block.block_hash) == block_id:
                del self.hash_to_block_id[block.block_hash]
            block.block_hash = None
            block.token_ids = ()
        block.ref_count = 1
        return block_id

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            self.free_block_ids.remove(block_id)
            self._free_set.discard(block_id)
        block.ref_count += 1

    # ---- invariants --------------------------------------------------------------------------
    def check_integrity(self, live_sequences: list[Sequence] | None = None) -> None:
        """Raise AssertionError if the block pool is inconsistent.

        Every block is free (ref 0, on the free list exactly once) or referenced (ref > 0, not
        on the free list); cached hashes point at blocks carrying that hash; and, given the
        live sequences, each block's ref count equals the number of block tables holding it.
        """
        assert len(self.free_block_ids) == len(self._free_set), "free list has duplicates"
        assert set(self.free_block_ids) == self._free_set, "free list and free set disagree"
        for block in self.blocks:
            on_free_list = block.block_id in self._free_set
            assert block.ref_count >= 0, f"block {block.block_id} has negative ref count"
            assert on_free_list == (block.ref_count == 0), (
                f"block {block.block_id}: ref_count={block.ref_count} but on_free_list={on_free_list}"
            )
        for h, block_id in self.hash_to_block_id.items():
            assert self.blocks[block_id].block_hash == h, f"hash index points at block {block_id} with other hash"
        if live_sequences is not None:
            refs = [0] * self.num_blocks
            for seq in live_sequences:
                for block_id in seq.block_table:
                    refs[block_id] += 1
            for block in self.blocks:
                assert block.ref_count == refs[block.block_id], (
                    f"block {block.block_id}: ref_count={block.ref_count}, held by {refs[block.block_id]} tables"
                )
