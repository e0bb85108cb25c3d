"""From Hugging Face names and config to Kiln's: per-architecture state-transform tables.

The idea is NeMo's checkpoint connectors: a table of `StateTransform`s, each mapping one Kiln
tensor to the HF tensors it is made of (a `*` wildcard stands for the layer index) and a fusing
function (q/k/v -> qkv, gate/up -> gate_up). Applying a table is a loop over its entries, one
Kiln tensor at a time, so only a few tensors are ever in memory.

Kiln tensor names and shapes (tp=1; nq=num_heads, nkv=num_kv_heads, hd=head_dim, H=hidden,
I=intermediate, V=vocab) are given by `expected_shapes(model_config)`; the runtime loads exactly
these from `rank{r}.safetensors`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from engine.config import ModelConfig
from engine.errors import CheckpointError

# HF `architectures[0]` -> Kiln architecture name.
HF_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear", "dynamic")


def identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def concat_rows(*tensors: torch.Tensor) -> torch.Tensor:
    """Fuse projections that read the same input: (r1, H), (r2, H), ... -> (r1 + r2 + ..., H)."""
    return torch.cat(tensors, dim=0)


@dataclass(frozen=True)
class StateTransform:
    """One Kiln tensor (`target`) made from HF tensors (`sources`) by `fuse`.

    `*` in `target` and `sources` is the layer index. `when` restricts the transform to models
    whose config has the feature (bias, q/k norm, untied head).
    """

    target: str
    sources: tuple[str, ...]
    fuse: Callable[..., torch.Tensor] = identity
    when: Callable[[ModelConfig], bool] | None = None


def _layer(name: str) -> str:
    return f"model.layers.*.{name}"


# One table covers the Llama family: Mistral, Qwen2 and Qwen3 share Llama's HF names and differ
# only in features switched on by their config.
LLAMA_FAMILY: tuple[StateTransform, ...] = (
    StateTransform("embed_tokens.weight", ("model.embed_tokens.weight",)),
    StateTransform("layers.*.input_layernorm.weight", (_layer("input_layernorm.weight"),)),
    StateTransform(
        "layers.*.self_attn.qkv_proj.weight",
        (_layer("self_attn.q_proj.weight"), _layer("self_attn.k_proj.weight"), _layer("self_attn.v_proj.weight")),
        concat_rows,
    ),
    StateTransform(
        "layers.*.self_attn.qkv_proj.bias",
        (_layer("self_attn.q_proj.bias"), _layer("self_attn.k_proj.bias"), _layer("self_attn.v_proj.bias")),
        concat_rows,
        when=lambda m: m.qkv_bias,
    ),
    StateTransform("layers.*.self_attn.q_norm.weight", (_layer("self_attn.q_norm.weight"),), when=lambda m: m.qk_norm),
    StateTransform("layers.*.self_attn.k_norm.weight", (_layer("self_attn.k_norm.weight"),), when=lambda m: m.qk_norm),
    StateTransform("layers.*.self_attn.o_proj.weight", (_layer("self_attn.o_proj.weight"),)),
    StateTransform("layers.*.post_attention_layernorm.weight", (_layer("post_attention_layernorm.weight"),)),
    StateTransform(
        "layers.*.mlp.gate_up_proj.weight",
        (_layer("mlp.gate_proj.weight"), _layer("mlp.up_proj.weight")),
        concat_rows,
    ),
    StateTransform("layers.*.mlp.down_proj.weight", (_layer("mlp.down_proj.weight"),)),
    StateTransform("norm.weight", ("model.norm.weight",)),
    StateTransform("lm_head.weight", ("lm_head.weight",), when=lambda m: not m.tie_word_embeddings),
)

TRANSFORMS: dict[str, tuple[StateTransform, ...]] = {arch: LLAMA_FAMILY for arch in HF_ARCHITECTURES.values()}

# HF tensors that carry no weights Kiln needs (recomputed buffers, the duplicate of a tied head).
IGNORED_SOURCES: tuple[str, ...] = ("model.layers.*.self_attn.rotary_emb.inv_freq",)


@dataclass(frozen=True)
class PlannedTensor:
    """One concrete Kiln tensor of one model: its name, HF source names and fusing function."""

    name: str
    sources: tuple[str, ...]
    fuse: Callable[..., torch.Tensor]


def plan(architecture: str, model: ModelConfig) -> list[PlannedTensor]:
    """Expand the architecture's table for this model: wildcards -> layer indices, features applied."""
    planned: list[PlannedTensor] = []
    for t in TRANSFORMS[architecture]:
        if t.when is not None and not t.when(model):
            continue
        layers = [str(i) for i in range(model.num_layers)] if "*" in t.target else ["*"]
        for i in layers:
            sources = tuple(s.replace("*", i) for s in t.sources)
            planned.append(PlannedTensor(t.target.replace("*", i), sources, t.fuse))
    return planned


def ignored_sources(model: ModelConfig) -> set[str]:
    names = {p.replace("*", str(i)) for p in IGNORED_SOURCES for i in range(model.num_layers)}
    if model.tie_word_embeddings:
        names.add("lm_head.weight")  # some checkpoints save the tied head twice
    return names


def expected_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Kiln tensor name -> shape at tp=1 (the contract between the builder and the runtime)."""
    H, inter, V, hd = model.hidden_size, model.intermediate_size, model.vocab_size, model.head_dim
    qkv_rows = (model.num_heads + 2 * model.num_kv_heads) * hd
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (V, H), "norm.weight": (H,)}
    for i in range(model.num_layers):
        p = f"layers.{i}."
        shapes[p + "input_layernorm.weight"] = (H,)
        shapes[p + "self_attn.qkv_proj.weight"] = (qkv_rows, H)
        if model.qkv_bias:
            shapes[p + "self_attn.qkv_proj.bias"] = (qkv_rows,)
        if model.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (hd,)
            shapes[p + "self_attn.k_norm.weight"] = (hd,)
        shapes[p + "self_attn.o_proj.weight"] = (H, model.num_heads * hd)
        shapes[p + "post_attention_layernorm.weight"] = (H,)
        shapes[p + "mlp.gate_up_proj.weight"] = (2 * inter, H)
        shapes[p + "mlp.down_proj.weight"] = (H, inter)
    if not model.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, H)
    return shapes


def iter_kiln_tensors(
    architecture: str, model: ModelConfig, load: Callable[[str], torch.Tensor], available: set[str]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(kiln_name, tensor)` in table order, loading HF tensors one transform at a time.

    `load(hf_name)` returns one HF tensor; `available` is the set of HF names in the checkpoint.
    Raises CheckpointError for a missing source tensor, an unexpected shape, or HF tensors that no
    transform consumes (a checkpoint whose features the config does not describe).
    """
    planned = plan(architecture, model)
    consumed = {s for p in planned for s in p.sources}
    missing = [s for p in planned for s in p.sources if s not in available]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"tensor {missing[0]!r} is missing from the checkpoint{more}")
    unused = sorted(available - consumed - ignored_sources(model))
    if unused:
        raise CheckpointError(
            f"checkpoint has tensors Kiln's {architecture} model does not use: {unused[:4]}"
            f"{' ...' if len(unused) > 4 else ''} (its config.json does not match its weights?)"
        )
    shapes = expected_shapes(model)
    for p in planned:
        tensor = p.fuse(*(load(s) for s in p.sources))
        if tuple(tensor.shape) != shapes[p.name]:
            raise CheckpointError(
                f"tensor {p.name!r} (from {list(p.sources)}) has shape {tuple(tensor.shape)}, "
                f"config.json implies {shapes[p.name]}"
            )
        yield p.name, tensor


# --------------------------------------------------------------------------- config


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Normalize rope settings of transformers 4 (`rope_theta` + `rope_scaling`) and 5
    (`rope_parameters` with `rope_theta` and `rope_type` inside) to (theta, scaling or None)."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        params = params.get("full_attention")  # per-layer-type form; Kiln models are all full attention
    merged: dict[str, Any] = {}
    if isinstance(hf.get("rope_scaling"), dict):
        merged.update(hf["rope_scaling"])
    if isinstance(params, dict):
        merged.update(params)
    theta = merged.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
    legacy_type = merged.pop("type", None)
    rope_type = merged.pop("rope_type", None) or legacy_type or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(
            f"config.json: rope type {rope_type!r} is not supported (supported: {list(SUPPORTED_ROPE_TYPES)})"
        )
    if rope_type == "default":
        return float(theta), None
    return float(theta), {"rope_type": rope_type, **merged}


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _require(hf: dict[str, Any], key: str) -> Any:
    if hf.get(key) is None:
        raise CheckpointError(f"config.json: missing field {key!r}")
    return hf[key]


def model_config_from_hf(
    hf_config: dict[str, Any], generation_config: dict[str, Any] | None = None
) -> tuple[str, ModelConfig]:
    """Map a HF `config.json` (and `generation_config.json`) to (Kiln architecture, ModelConfig).

    Raises CheckpointError naming the field for unsupported architectures or features.
    """
    archs = hf_config.get("architectures") or []
    hf_arch = archs[0] if archs else None
    if hf_arch not in HF_ARCHITECTURES:
        raise CheckpointError(
            f"config.json: architecture {hf_arch!r} is not supported; Kiln builds {sorted(HF_ARCHITECTURES)}"
        )
    arch = HF_ARCHITECTURES[hf_arch]
    hidden = int(_require(hf_config, "hidden_size"))
    num_heads = int(_require(hf_config, "num_attention_heads"))
    num_kv_heads = int(hf_config.get("num_key_value_heads") or num_heads)
    head_dim = int(hf_config.get("head_dim") or hidden // num_heads)
    act = hf_config.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"config.json: hidden_act {act!r} is not supported (Kiln runs SwiGLU with 'silu')")
    if hf_config.get("mlp_bias"):
        raise CheckpointError("config.json: mlp_bias=true is not supported")
    attention_bias = bool(hf_config.get("attention_bias", False))
    if attention_bias and arch != "qwen2":
        # Llama/Qwen3 `attention_bias` also puts a bias on o_proj, which Kiln's layers do not have.
        raise CheckpointError("config.json: attention_bias=true (o_proj bias) is not supported")
    if num_heads % num_kv_heads:
        raise CheckpointError(
            f"config.json: num_attention_heads ({num_heads}) is not a multiple of num_key_value_heads ({num_kv_heads})"
        )
    rope_theta, rope_scaling = _rope(hf_config)
    max_positions = int(hf_config.get("max_position_embeddings") or 2048)
    window = hf_config.get("sliding_window")
    uses_window = hf_config.get("use_sliding_window", arch == "mistral")
    if window and uses_window:
        # Kiln attends over the full context; within one window that is exactly sliding-window
        # attention, so the engine is limited to the window.
        max_positions = min(max_positions, int(window))

    eos: list[int] = []
    for value in (hf_config.get("eos_token_id"), (generation_config or {}).get("eos_token_id")):
        eos += [i for i in _ids(value) if i not in eos]
    model = ModelConfig(
        hidden_size=hidden,
        intermediate_size=int(_require(hf_config, "intermediate_size")),
        num_layers=int(_require(hf_config, "num_hidden_layers")),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        vocab_size=int(_require(hf_config, "vocab_size")),
        rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=max_positions,
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        qkv_bias=arch == "qwen2" or attention_bias,
        qk_norm=arch == "qwen3",
        hidden_act=act,
        bos_token_id=hf_config.get("bos_token_id"),
        eos_token_ids=tuple(eos),
        pad_token_id=hf_config.get("pad_token_id"),
    )
    return arch, model
