"""serving/backends/hf_batch: rows join left-padded, leave with one select, and columns that
are padding in every row are trimmed; each row's real K/V stays intact through all of it."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from serving.backends.hf_batch import PaddedKVBatch

LAYERS, HEADS, DIM = 2, 2, 4


def _prefilled(length: int, fill: float) -> DynamicCache:
    """A batch-1 cache of `length` tokens whose K/V are all `fill` (V = -fill)."""
    cache = DynamicCache()
    for layer in range(LAYERS):
        k = torch.full((1, HEADS, length, DIM), fill)  # (1, H, T, D)
        cache.update(k, -k, layer)
    return cache


def _row(batch: PaddedKVBatch, request_id: str) -> torch.Tensor:
    """Real (unpadded) keys of one row in layer 0: (H, T, D)."""
    i = batch.request_ids.index(request_id)
    return batch.cache.layers[0].keys[i, :, batch.pads[i]:]


def test_rows_join_padded_leave_and_trim() -> None:
    batch = PaddedKVBatch()
    batch.add("a", _prefilled(3, 1.0))
    batch.add("b", _prefilled(5, 2.0))  # longer than the batch: "a" gets padded
    batch.add("c", _prefilled(2, 3.0))  # shorter: "c" is padded
    assert (batch.request_ids, batch.pads, batch.width) == (["a", "b", "c"], [2, 0, 3], 5)
    assert batch.attention_mask().tolist() == [[0, 0, 1, 1, 1, 1], [1] * 6, [0, 0, 0, 1, 1, 1]]
    assert batch.cache.layers[1].values.shape == (3, HEADS, 5, DIM)
    assert float(batch.cache.layers[0].keys[0, :, :2].abs().sum()) == 0.0  # padding is zeros

    assert batch.retain({"a", "c"}) == ["b"]  # the longest row leaves: 2 columns are padding everywhere
    assert (batch.request_ids, batch.pads, batch.width) == (["a", "c"], [0, 1], 3)
    assert torch.equal(_row(batch, "a"), torch.full((HEADS, 3, DIM), 1.0))
    assert torch.equal(_row(batch, "c"), torch.full((HEADS, 2, DIM), 3.0))
    assert batch.retain({"a", "c"}) == []

    assert batch.retain(set()) == ["a", "c"]
    assert (batch.num_rows, batch.width, batch.cache) == (0, 0, None)
    batch.add("d", _prefilled(4, 5.0))  # an empty batch takes the new cache as is
    assert (batch.request_ids, batch.pads, batch.width) == (["d"], [0], 4)
