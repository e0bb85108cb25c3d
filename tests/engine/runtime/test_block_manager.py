"""The block pool hands out exact block ids, counts references, and reuses cached prefixes."""

from __future__ import annotations

import pytest

from engine import SamplingParams
from engine.runtime.block_manager import BlockManager
from engine.runtime.sequence import Sequence


def seq(request_id: str, tokens: list[int]) -> Sequence:
    return Sequence(request_id, tokens, SamplingParams(max_tokens=4))


def compute(bm: BlockManager, s: Sequence, n: int) -> None:
    assert bm.allocate_slots(s, n)
    s.num_computed_tokens += n
    bm.register_full_blocks(s)


def test_allocate_and_free_exact_block_ids():
    bm = BlockManager(num_blocks=6, block_size=4)
    a = seq("a", list(range(10)))
    assert bm.allocate_slots(a, 10)
    assert a.block_table == [0, 1, 2]
    b = seq("b", list(range(100, 105)))
    assert bm.allocate_slots(b, 5)
    assert b.block_table == [3, 4]
    assert bm.num_free_blocks == 1
    assert not bm.allocate_slots(seq("c", list(range(9))), 9)  # needs 3, one free
    bm.check_integrity([a, b])
    bm.free(a)
    assert bm.num_free_blocks == 4 and list(bm.free_block_ids) == [5, 2, 1, 0]
    bm.check_integrity([b])


def test_growth_allocates_only_when_a_block_fills():
    bm = BlockManager(num_blocks=4, block_size=4)
    s = seq("a", [1, 2, 3])
    compute(bm, s, 3)
    assert s.block_table == [0]
    s.append_token(4)
    compute(bm, s, 1)  # token 4 fills block 0
    assert s.block_table == [0]
    s.append_token(5)
    compute(bm, s, 1)
    assert s.block_table == [0, 1]


def test_prefix_cache_hits_share_blocks_and_survive_free():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq("a", list(range(10)))  # blocks [0,1] full, [2] partial
    compute(bm, a, 10)
    b = seq("b", list(range(8)) + [50, 51, 52])
    hits = bm.find_cached_prefix(b)
    assert hits == [0, 1]
    bm.allocate_prefix(b, hits)
    assert b.num_computed_tokens == 8 and bm.blocks[0].ref_count == 2
    bm.check_integrity([a, b])
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8
    # Freed blocks keep their hash: a third request still hits them.
    c = seq("c", list(range(9)))
    assert bm.find_cached_prefix(c) == [0, 1]
    assert bm.prefix_cache_hits == 8


def test_prefix_lookup_always_leaves_one_token_to_compute():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq("a", list(range(8)))
    compute(bm, a, 8)
    assert bm.find_cached_prefix(seq("b", list(range(8)))) == [0]  # not both blocks


def test_reallocation_evicts_cached_hash():
    bm = BlockManager(num_blocks=2, block_size=4)
    a = seq("a", [1, 2, 3, 4, 5])
    compute(bm, a, 5)
    bm.free(a)
    b = seq("b", [9, 9, 9, 9, 9, 9, 9, 9])
    assert bm.allocate_slots(b, 8)  # takes both blocks, evicting a's cached block
    assert bm.hash_to_block_id == {}
    assert bm.find_cached_prefix(seq("c", [1, 2, 3, 4, 5])) == []
    bm.check_integrity([b])


def test_integrity_checker_catches_broken_pool():
    bm = BlockManager(num_blocks=3, block_size=4)
    a = seq("a", [1, 2])
    assert bm.allocate_slots(a, 2)
    bm.blocks[a.block_table[0]].ref_count = 0  # corrupt it
    with pytest.raises(AssertionError):
        bm.check_integrity([a])
