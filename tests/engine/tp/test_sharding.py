"""`build-engine --tp N`: split rules, shard files and their sizes (engine/build/sharding.py)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from engine.build.sharding import check_tp_split, shard_tensor
from engine.config import ModelConfig, load_engine_config
from engine.errors import BuildError


def _model(nq: int = 4, nkv: int = 2, hd: int = 2, hidden: int = 8, inter: int = 8, vocab: int = 10) -> ModelConfig:
    return ModelConfig(hidden_size=hidden, intermediate_size=inter, num_layers=1, num_heads=nq,
                       num_kv_heads=nkv, head_dim=hd, vocab_size=vocab)


def _rows(t: torch.Tensor) -> list[float]:
    return t[:, 0].tolist()


def test_qkv_split_per_head_group_with_kv_replication() -> None:
    m = _model(nq=4, nkv=2, hd=2)
    # Row value = row index: q rows 0..7 (4 heads x hd 2), k rows 8..11, v rows 12..15.
    qkv = torch.arange(16, dtype=torch.float32).unsqueeze(1).repeat(1, 8)
    name = "layers.0.self_attn.qkv_proj.weight"
    assert [_rows(shard_tensor(name, qkv, m, 2, r)) for r in range(2)] == [
        [0, 1, 2, 3, 8, 9, 12, 13], [4, 5, 6, 7, 10, 11, 14, 15]]
    # tp 4 > 2 KV heads: query head r attends KV head r // 2, which rank r replicates.
    assert [_rows(shard_tensor(name, qkv, m, 4, r)) for r in range(4)] == [
        [0, 1, 8, 9, 12, 13], [2, 3, 8, 9, 12, 13], [4, 5, 10, 11, 14, 15], [6, 7, 10, 11, 14, 15]]
    bias = torch.arange(16, dtype=torch.float32)
    assert shard_tensor("layers.0.self_attn.qkv_proj.bias", bias, m, 4, 3).tolist() == [6, 7, 10, 11, 14, 15]


def test_mqa_replicates_its_single_kv_head_on_every_rank() -> None:
    m = _model(nq=4, nkv=1, hd=1)
    qkv = torch.arange(6, dtype=torch.float32).unsqueeze(1)
    assert [_rows(shard_tensor("layers.0.self_attn.qkv_proj.weight", qkv, m, 4, r)) for r in range(4)] == [
        [0, 4, 5], [1, 4, 5], [2, 4, 5], [3, 4, 5]]


def test_gate_up_row_parallel_vocab_and_replicated_rules() -> None:
    m = _model(inter=4, vocab=5, hidden=4)
    gate_up = torch.arange(8, dtype=torch.float32).unsqueeze(1)  # gate rows 0..3, up rows 4..7
    assert _rows(shard_tensor("layers.0.mlp.gate_up_proj.weight", gate_up, m, 2, 1)) == [2, 3, 6, 7]
    down = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    assert shard_tensor("layers.0.mlp.down_proj.weight", down, m, 2, 1).tolist() == down[:, 2:].tolist()
    o_proj = torch.arange(32, dtype=torch.float32).reshape(4, 8)
    assert shard_tensor("layers.0.self_attn.o_proj.weight", o_proj, m, 4, 2).tolist() == o_proj[:, 4:6].tolist()
    embed = torch.arange(1, 6, dtype=torch.float32).unsqueeze(1)  # V=5 -> ceil(5/2)=3 rows per rank
    assert _rows(shard_tensor("embed_tokens.weight", embed, m, 2, 0)) == [1, 2, 3]
    assert _rows(shard_tensor("embed_tokens.weight", embed, m, 2, 1)) == [4, 5, 0]  # zero padding row
    norm = torch.arange(4, dtype=torch.float32)
    assert shard_tensor("layers.0.input_layernorm.weight", norm, m, 2, 1).tolist() == norm.tolist()
    # A quantized vocab table: int8 rows and their (V,) scales (or int4 (V, H/2) + (V, H/group))
    # split by vocab rows like the float table; padding rows are zero (scale 0: they dequantize to 0).
    q_embed = torch.arange(1, 11, dtype=torch.int8).reshape(5, 2)
    assert shard_tensor("embed_tokens.weight", q_embed, m, 2, 1).tolist() == [[7, 8], [9, 10], [0, 0]]
    q_scale = torch.arange(1, 6, dtype=torch.float32)
    assert shard_tensor("embed_tokens.weight_scale", q_scale, m, 2, 1).tolist() == [4, 5, 0]
    group_scales = torch.arange(1, 11, dtype=torch.float32).reshape(5, 2)
    assert shard_tensor("lm_head.weight_scale", group_scales, m, 2, 0).tolist() == [[1, 2], [3, 4], [5, 6]]
    # Quantization scales shard with their weight: per-output-channel of a column-parallel layer
    # splits like its rows; per-output-channel of a row-parallel layer and per-tensor are replicated.
    scale = torch.arange(8, dtype=torch.float32).unsqueeze(1)
    assert _rows(shard_tensor("layers.0.mlp.gate_up_proj.weight_scale", scale, m, 2, 1)) == [2, 3, 6, 7]
    row_scale = torch.arange(4, dtype=torch.float32)  # (out,): each rank's partial sum is in this scale
    assert shard_tensor("layers.0.mlp.down_proj.weight_scale", row_scale, m, 2, 1).tolist() == [0, 1, 2, 3]
    assert shard_tensor("layers.0.mlp.down_proj.input_scale", torch.tensor(2.0), m, 2, 1).item() == 2.0
    # Kiln's quantized layouts (engine/quant/modelopt_format.py): pre_quant_scale (in,) follows
    # the input features: whole for column-parallel layers, split for row-parallel ones.
    pqs = torch.arange(4, dtype=torch.float32)
    assert shard_tensor("layers.0.mlp.gate_up_proj.pre_quant_scale", pqs, m, 2, 1).tolist() == [0, 1, 2, 3]
    assert shard_tensor("layers.0.mlp.down_proj.pre_quant_scale", pqs, m, 2, 1).tolist() == [2, 3]
    int4 = torch.arange(16, dtype=torch.uint8).reshape(4, 4)  # down_proj (out 4, in 8 packed to 4)
    assert shard_tensor("layers.0.mlp.down_proj.weight", int4, m, 2, 0).tolist() == int4[:, :2].tolist()
    group_scale = torch.arange(8, dtype=torch.float32).reshape(4, 2)  # (out, in / group)
    assert shard_tensor("layers.0.mlp.down_proj.weight_scale", group_scale, m, 2, 1).tolist() == [[1], [3], [5], [7]]


@pytest.mark.parametrize(
    ("nq", "nkv", "tp", "message"),
    [(4, 4, 8, "--tp 8 is larger than the model's 4 attention heads"),
     (6, 6, 4, "--tp 4 does not divide the model's 6 attention heads"),
     (8, 6, 4, "--tp 4 does not divide the model's 6 KV heads"),
     (6, 2, 3, "--tp 3 is not a multiple of the model's 2 KV heads")],
)
def test_impossible_splits_are_build_errors(nq: int, nkv: int, tp: int, message: str) -> None:
    with pytest.raises(BuildError, match=message):
        check_tp_split(_model(nq=nq, nkv=nkv, inter=24), tp)


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118


def _expected_shard_shape(name: str, shape: tuple[int, ...], m: ModelConfig, tp: int) -> tuple[int, ...]:
    hd, hidden = m.head_dim, m.hidden_size
    if name.startswith(("embed_tokens.", "lm_head.")):
        return (math.ceil(m.vocab_size / tp), hidden)
    if ".qkv_proj." in name:
        return ((m.num_heads // tp + 2 * max(1, m.num_kv_heads // tp)) * hd, *shape[1:])
    if ".gate_up_proj." in name:
        return (2 * m.intermediate_size // tp, hidden)
    if ".o_proj." in name or ".down_proj." in name:
        return (hidden, shape[1] // tp)
    return shape


@pytest.mark.parametrize("tp", [2, 4])
def test_shard_files_have_expected_shapes_and_sizes(tp_engine: Callable[..., Path], tp: int) -> None:
    full_dir, tp_dir = tp_engine("llama-gqa", 1), tp_engine("llama-gqa", tp)
    m = load_engine_config(tp_dir).model
    assert load_engine_config(tp_dir).build.tp_size == tp
    assert sorted(p.name for p in tp_dir.glob("rank*.safetensors")) == [f"rank{r}.safetensors" for r in range(tp)]
    full = _shapes(full_dir / "rank0.safetensors")
    for r in range(tp):
        shard = _shapes(tp_dir / f"rank{r}.safetensors")
        assert shard == {n: _expected_shard_shape(n, s, m, tp) for n, s in full.items()}, f"rank {r}"

    # Bytes: the unsharded engine, plus the replicated parts (norms on N ranks, KV heads
    # replicated when num_kv_heads < N), plus the vocab's zero padding rows. float32 = 4 bytes.
    def numel(names: list[str]) -> int:
        return sum(math.prod(full[n]) for n in names)

    norms = [n for n in full if "norm" in n]
    kv_rows_total = tp * max(1, m.num_kv_heads // tp) * m.head_dim * 2  # K and V rows over all ranks
    kv_extra = m.num_layers * (kv_rows_total - 2 * m.num_kv_heads * m.head_dim) * m.hidden_size
    pad = (tp * math.ceil(m.vocab_size / tp) - m.vocab_size) * m.hidden_size
    expected_bytes = 4 * (numel(list(full)) + (tp - 1) * numel(norms) + kv_extra + pad)
    report = json.loads((tp_dir / "build_report.json").read_text())
    assert sum(report["bytes_per_rank"].values()) == expected_bytes
    full_bytes = json.loads((full_dir / "build_report.json").read_text())["bytes_per_rank"]["rank0.safetensors"]
    assert full_bytes == 4 * numel(list(full))
    assert max(report["bytes_per_rank"].values()) < full_bytes  # every rank holds less than the model
    assert kv_extra == (0 if tp == 2 else m.num_layers * 2 * 2 * m.head_dim * m.hidden_size)


def test_shards_reassemble_to_the_unsharded_tensors(tp_engine: Callable[..., Path]) -> None:
    full_dir, tp_dir = tp_engine("llama-gqa", 1), tp_engine("llama-gqa", 2)
    m = load_engine_config(tp_dir).model
    with safe_open(str(full_dir / "rank0.safetensors"), framework="pt") as f:
        full = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    shards = []
    for r in range(2):
        with safe_open(str(tp_dir / f"rank{r}.safetensors"), framework="pt") as f:
            shards.append({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    name = "layers.1.self_attn.o_proj.weight"
    assert torch.equal(torch.cat([s[name] for s in shards], dim=1), full[name])
    embed = torch.cat([s["embed_tokens.weight"] for s in shards])
    assert torch.equal(embed[: m.vocab_size], full["embed_tokens.weight"])
    assert not embed[m.vocab_size:].any()
    gate_up = [s["layers.0.mlp.gate_up_proj.weight"].chunk(2) for s in shards]
    assert torch.equal(torch.cat([g for g, _ in gate_up] + [u for _, u in gate_up]), full["layers.0.mlp.gate_up_proj.weight"])
