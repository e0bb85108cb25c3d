"""Executes one scheduled step on the model: flattens the batch, writes K/V into the paged
cache, runs attention over block tables, and returns logits for the sequences that sample."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.model.attention import AttentionMetadata, PrefillChunk
from engine.model.layers import local_head_counts
from engine.model.llama import LlamaForCausalLM
from engine.quant.kv_cache import kv_storage
from engine.quant.methods import process_weights_after_loading
from engine.runtime.scheduler import ScheduledSequence
from engine.runtime.weights import load_prompt_table, load_rank_weights

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int  # on this rank
    head_dim: int
    block_size: int
    dtype: torch.dtype  # cache element dtype (int8 / float8_e4m3fn for a quantized cache)
    scale_dtype: torch.dtype | None = None  # per token-head scale of a quantized cache

    @property
    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        if self.scale_dtype is not None:
            elem = elem * self.head_dim + torch.empty((), dtype=self.scale_dtype).element_size()
            return self.num_layers * 2 * self.block_size * self.num_kv_heads * elem
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * elem


@dataclass(frozen=True)
class StepBatch:
    """One step, flattened (decodes first, then prefill chunks), as plain Python lists so that
    it pickles cheaply to tensor-parallel workers."""

    input_ids: list[int]  # (T,)
    positions: list[int]  # (T,)
    slot_mapping: list[int]  # (T,) cache slot of each token's K/V
    prefill_chunks: list[tuple[int, int, int, list[int] | None]]  # (start, end, context_len, block table
    #   when the chunk continues a cached context, else None)
    decode_tables: list[list[int]]  # block table of each decode
    decode_context_lens: list[int]
    sample_rows: list[int]  # token rows whose logits are sampled
    all_logits: bool = False
    # (token row, task, virtual position): rows embedded from the prompt table, not embed_tokens
    virtual_rows: list[tuple[int, str, int]] = field(default_factory=list)


class ModelRunner:
    def __init__(self, engine_dir: str | Path, config: EngineConfig, device: torch.device,
                 dtype: torch.dtype, num_kv_blocks: int, rank: int = 0) -> None:
        self.config = config
        self.device = device
        self.dtype = dtype
        self.block_size = config.build.kv_block_size
        cfg = config.model
        with torch.device("cpu"):
            self.model = LlamaForCausalLM(cfg, dtype, max_positions=config.build.max_seq_len,
                                          quant=config.build.quantization)
        load_rank_weights(self.model, engine_dir, rank)
        # Virtual-token embeddings of prompt-tuned tasks: {task: (V, H)}, on every rank.
        self.prompt_table = {
            name: table.to(device=device, dtype=dtype) for name, table in load_prompt_table(engine_dir, cfg).items()
        }
        self.model.to(device)
        process_weights_after_loading(self.model)  # quantized layers: kernel layouts (no-op otherwise)
        self.model.eval()
        _, kv_heads = local_head_counts(cfg.num_heads, cfg.num_kv_heads)
        cache_dtype, scale_dtype = kv_storage(config.build.quantization.kv_cache_dtype, dtype)
        self.kv_spec = KVCacheSpec(cfg.num_layers, kv_heads, cfg.head_dim, self.block_size, cache_dtype, scale_dtype)
        # (layers, 2, num_blocks, block_size, kv_heads, head_dim)
        self.kv_caches = torch.zeros(
            cfg.num_layers, 2, num_kv_blocks, self.block_size, kv_heads, cfg.head_dim, dtype=cache_dtype,
            device=device,
        )
        # int8/fp8 cache: one scale per token and KV head (engine/quant/kv_cache.py)
        self.kv_scales = None if scale_dtype is None else torch.zeros(
            cfg.num_layers, 2, num_kv_blocks, self.block_size, kv_heads, dtype=scale_dtype, device=device
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
        batch, sampling = self.prepare(scheduled, all_logits)
        return self.run(batch), sampling

    def prepare(self, scheduled: list[ScheduledSequence],
                all_logits: bool = False) -> tuple[StepBatch, list[ScheduledSequence]]:
        """Flatten a step into a StepBatch (plain lists: what tensor-parallel ranks receive)
        and the scheduled entries that sample, in logits row order."""
        decodes = [s for s in scheduled if s.num_new_tokens == 1]
        prefills = [s for s in scheduled if s.num_new_tokens > 1]
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        chunks: list[tuple[int, int, int, list[int] | None]] = []
        sample_rows: list[int] = []
        sampling: list[ScheduledSequence] = []
        virtual_rows: list[tuple[int, str, int]] = []
        for s in decodes + prefills:
            seq = s.seq
            start = seq.num_computed_tokens
            end = start + s.num_new_tokens
            token_start = len(input_ids)
            if seq.task is not None and start < seq.num_virtual_tokens:
                virtual_rows.extend((len(input_ids) + p - start, seq.task, p)
                                    for p in range(start, min(end, seq.num_virtual_tokens)))
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slot_mapping.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            if s.num_new_tokens > 1:
                chunks.append((token_start, len(input_ids), end, list(table) if start > 0 else None))
            if s.samples:
                sample_rows.append(len(input_ids) - 1)
                sampling.append(s)
        batch = StepBatch(
            input_ids=input_ids, positions=positions, slot_mapping=slot_mapping, prefill_chunks=chunks,
            decode_tables=[list(s.seq.block_table) for s in decodes],
            decode_context_lens=[s.seq.num_computed_tokens + 1 for s in decodes],
            sample_rows=sample_rows, all_logits=all_logits, virtual_rows=virtual_rows,
        )
        return batch, sampling

    @torch.inference_mode()
    def run(self, batch: StepBatch) -> torch.Tensor:
        """Run the model on a prepared step -> float32 logits: (len(sample_rows), V), or
        (T, V) with `all_logits`. Under tensor parallelism every rank calls this with the same
        batch (the model's collectives pair up) and every rank gets the full logits."""
        dev = self.device
        chunks = [
            PrefillChunk(start, stop, context_len,
                         None if table is None else self._context_slots([table], [context_len])[0])
            for start, stop, context_len, table in batch.prefill_chunks
        ]
        decode_slots = decode_mask = None
        if batch.decode_tables:
            ctx_lens = batch.decode_context_lens
            decode_slots = self._context_slots(batch.decode_tables, ctx_lens)
            max_len = decode_slots.shape[1]
            lens = torch.tensor(ctx_lens, device=dev)
            decode_mask = (torch.arange(max_len, device=dev).unsqueeze(0) < lens.unsqueeze(1)).view(
                len(ctx_lens), 1, 1, max_len
            )
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(batch.slot_mapping, dtype=torch.long, device=dev),
            num_decode_tokens=len(batch.decode_tables),
            decode_context_slots=decode_slots,
            decode_mask=decode_mask,
            prefills=chunks,
        )
        ids = torch.tensor(batch.input_ids, dtype=torch.long, device=dev)
        pos = torch.tensor(batch.positions, dtype=torch.long, device=dev)
        override = None
        if batch.virtual_rows:
            rows_idx = torch.tensor([r for r, _, _ in batch.virtual_rows], dtype=torch.long, device=dev)
            embeds = torch.stack([self.prompt_table[task][p] for _, task, p in batch.virtual_rows])  # (N, H)
            override = (rows_idx, embeds)
        hidden = self.model(ids, pos, self.kv_caches, meta, self.kv_scales, override)  # (T, H)
        if batch.all_logits:
            return self.model.compute_logits(hidden)
        if not batch.sample_rows:
            return torch.empty(0, self.config.model.vocab_size)
        rows = torch.tensor(batch.sample_rows, dtype=torch.long, device=dev)
        return self.model.compute_logits(hidden[rows])  # (S, V)

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
