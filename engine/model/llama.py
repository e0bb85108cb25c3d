"""The Llama-family decoder: Llama 2/3, Mistral, Qwen2 (qkv bias) and Qwen3 (q/k norm) are
one implementation; MHA, GQA and MQA differ only in `num_kv_heads`.

Parameter names equal Kiln's engine tensor names (e.g. `layers.0.self_attn.qkv_proj.weight`),
so loading a rank file is a loop over `state_dict()`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig, QuantConfig
from engine.model.attention import AttentionMetadata, paged_attention, write_kv
from engine.model.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
    local_head_counts,
)
from engine.parallel import all_gather_last_dim


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection holding this rank's query heads and KV heads."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 dtype: torch.dtype, quant: QuantConfig | None = None) -> None:
        nq, nkv = local_head_counts(num_heads, num_kv_heads)
        nn.Module.__init__(self)
        out = (nq + 2 * nkv) * head_dim
        self._init_weights(out, hidden, dtype, quant)
        self.bias = nn.Parameter(torch.empty(out, dtype=dtype), requires_grad=False) if bias else None
        self.q_size, self.kv_size = nq * head_dim, nkv * head_dim


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, dtype: torch.dtype,
                 quant: QuantConfig | None = None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = local_head_counts(cfg.num_heads, cfg.num_kv_heads)
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads,
                                          cfg.qkv_bias, dtype, quant)
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, dtype, quant)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.rope = rope

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
        """hidden: (T, H); kv_cache: (2, num_blocks, block_size, nkv, hd) -> (T, H).
        kv_scales (2, num_blocks, block_size, nkv) when the cache is int8/fp8."""
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.qkv_proj.q_size, self.qkv_proj.kv_size, self.qkv_proj.kv_size], dim=-1)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)  # (T, nq, hd)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)  # (T, nkv, hd)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope(positions, q), self.rope(positions, k)
        write_kv(k, v, kv_cache[0], kv_cache[1], meta.slot_mapping, kv_scales)
        out = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, kv_scales)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, quant: QuantConfig | None = None) -> None:
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {cfg.hidden_act!r} (Kiln supports silu)")
        self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, 2 * cfg.intermediate_size, False, dtype,
                                                 quant)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, dtype, quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (T, I/tp) each
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, dtype: torch.dtype,
                 quant: QuantConfig | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, rope, dtype, quant)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, dtype, quant)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
        residual = hidden
        hidden = self.self_attn(positions, self.input_layernorm(hidden), kv_cache, meta, kv_scales)
        hidden, residual = self.post_attention_layernorm.forward_residual(hidden, residual)
        return residual + self.mlp(hidden)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, max_positions: int,
                 quant: QuantConfig | None = None) -> None:
        """`quant`: the engine's weight quantization (None or algo "none": plain `dtype` weights)."""
        super().__init__()
        self.config = cfg
        rope = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype, quant)
        self.layers = nn.ModuleList(DecoderLayer(cfg, rope, dtype, quant) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = (None if cfg.tie_word_embeddings
                        else ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype, quant))
        self.rope = rope  # registered once; layers share it

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: torch.Tensor,
                meta: AttentionMetadata, kv_scales: torch.Tensor | None = None,
                embed_override: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """input_ids, positions: (T,); kv_caches: (layers, 2, num_blocks, block_size, nkv, hd) -> (T, H).
        kv_scales: (layers, 2, num_blocks, block_size, nkv) for an int8/fp8 cache, else None.
        embed_override: (rows (N,), embeddings (N, H)) replacing those rows' token embeddings
        (virtual tokens of prompt-tuned tasks)."""
        hidden = self.embed_tokens(input_ids)
        if embed_override is not None:
            hidden = hidden.index_copy(0, embed_override[0], embed_override[1].to(hidden.dtype))
        if kv_scales is None:
            for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
                hidden = layer(positions, hidden, kv_cache, meta)
        else:
            for layer, kv_cache, scales in zip(self.layers, kv_caches, kv_scales, strict=True):
                hidden = layer(positions, hidden, kv_cache, meta, scales)
        return self.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (S, H) -> float32 logits (S, vocab)."""
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        logits = all_gather_last_dim(head.linear(hidden))
        return logits[:, : self.config.vocab_size].float()
