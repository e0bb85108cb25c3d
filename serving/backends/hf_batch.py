"""The decode batch of the `hf` backend: running requests left-padded into one `DynamicCache`.

Each running request is one row of a transformers `DynamicCache` whose layers hold keys and
values of shape (rows, kv_heads, width, head_dim). Rows have different lengths, so each is
left-padded: row r's real tokens sit in columns pads[r]..width-1, and the attention mask of a
step is 0 on those pad columns. Left padding keeps the distance between any two real tokens
of a row, so causal and sliding-window masks (built by transformers from the 2D mask and the
cache length, exactly as for `generate` on a left-padded batch) and RoPE positions (passed
per row as `position_ids`) are unchanged by batching.

K/V tensors are copied only when the batch changes: a joining row is left-padded to the
width (or, when its prompt is longer, every other row is), leaving rows are dropped with one
index select, and columns that are padding in every row are trimmed off.
"""

from __future__ import annotations

from typing import Any

import torch


class PaddedKVBatch:
    """Rows (request ids) of one left-padded batched `DynamicCache`. Used by one thread only."""

    def __init__(self) -> None:
        self.cache: Any = None  # transformers DynamicCache, None while empty
        self.request_ids: list[str] = []
        self.pads: list[int] = []  # left padding (columns) of each row

    @property
    def num_rows(self) -> int:
        return len(self.request_ids)

    @property
    def width(self) -> int:
        """Columns of every layer's K/V (longest row plus its padding); 0 when empty."""
        return int(self.cache.get_seq_length()) if self.cache is not None else 0

    def add(self, request_id: str, cache: Any) -> None:
        """Append the row of `cache`, a batch-1 `DynamicCache` just filled by the request's prefill."""
        length = int(cache.get_seq_length())
        if self.cache is None:
            self.cache, self.request_ids, self.pads = cache, [request_id], [0]
            return
        if len(cache.layers) != len(self.cache.layers):
            raise RuntimeError(f"prefill cache has {len(cache.layers)} layers, the batch {len(self.cache.layers)}")
        width = self.width
        if length > width:  # the new row is the longest: pad the batch instead
            self._map_layers(lambda kv: _pad_left(kv, length - width))
            self.pads = [pad + length - width for pad in self.pads]
            width = length
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            if not theirs.is_initialized:  # layers that keep no K/V (KV sharing): nothing to merge
                continue
            mine.keys = torch.cat([mine.keys, _pad_left(theirs.keys, width - length)], dim=0)
            mine.values = torch.cat([mine.values, _pad_left(theirs.values, width - length)], dim=0)
        self.request_ids.append(request_id)
        self.pads.append(width - length)

    def retain(self, keep: set[str] | dict[str, Any]) -> list[str]:
        """Drop every row whose request id is not in `keep`; returns the dropped ids."""
        dropped = [rid for rid in self.request_ids if rid not in keep]
        if not dropped:
            return []
        rows = [i for i, rid in enumerate(self.request_ids) if rid in keep]
        if not rows:
            self.cache, self.request_ids, self.pads = None, [], []
            return dropped
        index = torch.tensor(rows)
        self.request_ids = [self.request_ids[i] for i in rows]
        self.pads = [self.pads[i] for i in rows]
        trim = min(self.pads)  # columns that are padding in every remaining row
        self.pads = [pad - trim for pad in self.pads]
        self._map_layers(lambda kv: kv.index_select(0, index.to(kv.device))[:, :, trim:])
        return dropped

    def attention_mask(self) -> torch.Tensor:
        """(rows, width + 1) int64 mask of the next decode step: 0 on pad columns, 1 elsewhere."""
        columns = torch.arange(self.width + 1)  # (W+1,)
        return (columns[None, :] >= torch.tensor(self.pads)[:, None]).long()  # (B, W+1)

    def _map_layers(self, fn: Any) -> None:
        for layer in self.cache.layers:
            if layer.is_initialized:
                layer.keys, layer.values = fn(layer.keys), fn(layer.values)


def _pad_left(kv: torch.Tensor, columns: int) -> torch.Tensor:
    """(B, H, T, D) -> (B, H, columns + T, D) with zeros in front."""
    if columns == 0:
        return kv
    return torch.nn.functional.pad(kv, (0, 0, columns, 0))
