"""Executes one scheduled step on the model: flattens the batch, writes K/V into the paged
cache, runs attention over block tables, and returns logits for the sequences that sample."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.model.attention import AttentionMetadata, PrefillChunk
from engine.model.layers import local_head_counts
from engine.model.llama import LlamaForCausalLM
from engine.runtime.scheduler import ScheduledSequence
from engine.runtime.weights import load_rank_weights

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int  # on this rank
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * elem


class ModelRunner:
    def __init__(self, engine_dir: str | Path, config: EngineConfig, device: torch.device,
                 dtype: torch.dtype, num_kv_blocks: int, rank: int = 0) -> None:
        self.config = config
        self.device = device
        self.dtype = dtype
        self.block_size = config.build.kv_block_size
        cfg = config.model
        with torch.device("cpu"):
            self.model = LlamaForCausalLM(cfg, dtype, max_positions=config.build.max_seq_len)
        load_rank_weights(self.model, engine_dir, rank)
        self.model.to(device)
        self.model.eval()
        _, kv_heads = local_head_counts(cfg.num_heads, cfg.num_kv_heads)
        self.kv_spec = KVCacheSpec(cfg.num_layers, kv_heads, cfg.head_dim, self.block_size, dtype)
        # (layers, 2, num_blocks, block_size, kv_heads, head_dim)
        self.kv_caches = torch.zeros(
            cfg.num_layers, 2, num_kv_blocks, self.block_size, kv_heads, cfg.head_dim, dtype=dtype, device=device
        )

    @property
    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSequence],
                all_logits: bool = False) -> tuple[torch.Tensor, list[ScheduledSequence]]:
        """Run one step. Returns (logits (S, V) float32, the S scheduled entries that sample),
        rows in the order of the returned list. With `all_logits`, returns instead the logits
        of every computed token (T, V), in batch order (decodes first, then prefills)."""
        decodes = [s for s in scheduled if s.num_new_tokens == 1]
        prefills = [s for s in scheduled if s.num_new_tokens > 1]
        ordered = decodes + prefills
        bs = self.block_size

        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        chunks: list[PrefillChunk] = []
        sample_rows: list[int] = []
        sampling: list[ScheduledSequence] = []
        for s in ordered:
            seq = s.seq
            start = seq.num_computed_tokens
            end = start + s.num_new_tokens
            token_start = len(input_ids)
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slot_mapping.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            if s.num_new_tokens > 1:
                slots = None
                if start > 0:
                    slots = self._context_slots([table], [end])[0]
                chunks.append(PrefillChunk(token_start, len(input_ids), end, slots))
            if s.samples:
                sample_rows.append(len(input_ids) - 1)
                sampling.append(s)

        dev = self.device
        decode_slots = decode_mask = None
        if decodes:
            ctx_lens = [s.seq.num_computed_tokens + 1 for s in decodes]
            decode_slots = self._context_slots([s.seq.block_table for s in decodes], ctx_lens)
            max_len = decode_slots.shape[1]
            lens = torch.tensor(ctx_lens, device=dev)
            decode_mask = (torch.arange(max_len, device=dev).unsqueeze(0) < lens.unsqueeze(1)).view(
                len(decodes), 1, 1, max_len
            )
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=dev),
            num_decode_tokens=len(decodes),
            decode_context_slots=decode_slots,
            decode_mask=decode_mask,
            prefills=chunks,
        )
        ids = torch.tensor(input_ids, dtype=torch.long, device=dev)
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        hidden = self.model(ids, pos, self.kv_caches, meta)  # (T, H)
        if all_logits:
            return self.model.compute_logits(hidden), sampling
        if not sample_rows:
            return torch.empty(0, self.config.model.vocab_size), []
        rows = torch.tensor(sample_rows, dtype=torch.long, device=dev)
        logits = self.model.compute_logits(hidden[rows])  # (S, V)
        return logits, sampling

    def _context_slots(self, tables: list[list[int]], lengths: list[int]) -> torch.Tensor:
        """Cache slots of positions 0..len-1 for each block table -> (N, max_len) int64,
        padded with valid (but masked) slots."""
        bs = self.block_size
        max_len = max(lengths)
        max_blocks = -(-max_len // bs)
        padded = [t[:max_blocks] + [0] * (max_blocks - len(t[:max_blocks])) for t in tables]
        table = torch.tensor(padded, dtype=torch.long, device=self.device)  # (N, max_blocks)
        pos = torch.arange(max_len, device=self.device)
        return table[:, pos // bs] * bs + pos % bs  # (N, max_len)
