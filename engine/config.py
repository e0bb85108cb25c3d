"""The engine directory's `config.json`: one parser, validated once, frozen afterwards.

Schema (format_version 1)::

    {
      "format_version": 1,
      "architecture": "llama" | "mistral" | "qwen2" | "qwen3",
      "model": {hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim,
                vocab_size, rms_norm_eps, rope_theta, rope_scaling, max_position_embeddings,
                tie_word_embeddings, qkv_bias, qk_norm, hidden_act, bos_token_id, eos_token_ids,
                pad_token_id},
      "build": {dtype, quantization: {algo, group_size, kv_cache_dtype}, tp_size,
                max_batch_size, max_seq_len, max_num_tokens, kv_block_size},
      "source": {checkpoint, files: {name: sha256}, adapters: [...], ...}
    }

Weights live in `rank{r}.safetensors` under Kiln's names (see `engine/build/transforms.py`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from engine.errors import EngineLoadError

FORMAT_VERSION = 1
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
DTYPES = ("float32", "bfloat16", "float16")
QUANT_ALGOS = ("none", "fp8", "int8_wo", "int4_awq", "w8a8_sq")
KV_CACHE_DTYPES = ("auto", "fp8", "int8")
EMBEDDING_QUANTS = ("none", "int8")


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))


@dataclass(frozen=True)
class QuantConfig:
    """Weight quantization `algo` of the decoder's linear layers (int4 in groups of `group_size`
    input columns), the KV-cache dtype, and `embedding`: "int8" when the vocab tables (the
    embedding, and the LM head or the tied embedding that serves as one) are per-row int8."""

    algo: str = "none"
    group_size: int | None = None
    kv_cache_dtype: str = "auto"
    embedding: str = "none"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class BuildConfig:
    """Limits and layout chosen at build time. Limits may be lowered at load time."""

    dtype: str = "float32"
    quantization: QuantConfig = field(default_factory=QuantConfig)
    tp_size: int = 1
    max_batch_size: int = 64
    max_seq_len: int = 2048
    max_num_tokens: int = 2048
    kv_block_size: int = 16


@dataclass(frozen=True)
class EngineConfig:
    architecture: str
    model: ModelConfig
    build: BuildConfig
    source: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "architecture": self.architecture,
            "model": asdict(self.model),
            "build": asdict(self.build),
            "source": self.source,
        }

    def save(self, engine_dir: str | Path) -> None:
        path = Path(engine_dir) / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def with_build(self, **overrides: Any) -> EngineConfig:
        return replace(self, build=replace(self.build, **overrides))


def _take(section: dict[str, Any], cls: type, where: str) -> dict[str, Any]:
    """Keep only the known keys of a section and check that required ones are present."""
    if not isinstance(section, dict):
        raise EngineLoadError(f"{where}: expected an object, got {type(section).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = set(section) - set(known)
    if unknown:
        raise EngineLoadError(f"{where}: unknown field(s) {sorted(unknown)}")
    return dict(section)


def _positive(value: Any, where: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise EngineLoadError(f"{where} must be a positive integer, got {value!r}")


def parse_engine_config(raw: dict[str, Any], origin: str = "config.json") -> EngineConfig:
    """Validate a decoded config.json. Every error names the offending field."""
    if not isinstance(raw, dict):
        raise EngineLoadError(f"{origin}: expected a JSON object")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise EngineLoadError(
            f"{origin}: format_version is {version!r}, this Kiln reads format_version {FORMAT_VERSION}; "
            "rebuild the engine with this version of build-engine"
        )
    arch = raw.get("architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise EngineLoadError(f"{origin}: architecture {arch!r} is not one of {list(SUPPORTED_ARCHITECTURES)}")
    for key in ("model", "build"):
        if key not in raw:
            raise EngineLoadError(f"{origin}: missing section {key!r}")

    model_raw = _take(raw["model"], ModelConfig, f"{origin}: model")
    try:
        model = ModelConfig(**model_raw)
    except TypeError as exc:
        raise EngineLoadError(f"{origin}: model: {exc}") from None
    for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "vocab_size"):
        _positive(getattr(model, name), f"{origin}: model.{name}")
    if model.num_heads % model.num_kv_heads:
        raise EngineLoadError(
            f"{origin}: model.num_heads ({model.num_heads}) is not a multiple of "
            f"model.num_kv_heads ({model.num_kv_heads})"
        )

    build_raw = _take(raw["build"], BuildConfig, f"{origin}: build")
    quant_raw = _take(build_raw.pop("quantization", {}), QuantConfig, f"{origin}: build.quantization")
    try:
        quant = QuantConfig(**quant_raw)
        build = BuildConfig(quantization=quant, **build_raw)
    except TypeError as exc:
        raise EngineLoadError(f"{origin}: build: {exc}") from None
    if build.dtype not in DTYPES:
        raise EngineLoadError(f"{origin}: build.dtype {build.dtype!r} is not one of {list(DTYPES)}")
    if quant.algo not in QUANT_ALGOS:
        raise EngineLoadError(f"{origin}: build.quantization.algo {quant.algo!r} is not one of {list(QUANT_ALGOS)}")
    if quant.kv_cache_dtype not in KV_CACHE_DTYPES:
        raise EngineLoadError(
            f"{origin}: build.quantization.kv_cache_dtype {quant.kv_cache_dtype!r} is not one of "
            f"{list(KV_CACHE_DTYPES)}"
        )
    if quant.embedding not in EMBEDDING_QUANTS:
        raise EngineLoadError(
            f"{origin}: build.quantization.embedding {quant.embedding!r} is not one of {list(EMBEDDING_QUANTS)}"
        )
    for name in ("tp_size", "max_batch_size", "max_seq_len", "max_num_tokens", "kv_block_size"):
        _positive(getattr(build, name), f"{origin}: build.{name}")
    source = raw.get("source", {})
    return EngineConfig(architecture=arch, model=model, build=build, source=source, format_version=version)


def load_engine_config(engine_dir: str | Path) -> EngineConfig:
    """Read and validate `<engine_dir>/config.json`."""
    path = Path(engine_dir) / "config.json"
    if not Path(engine_dir).is_dir():
        raise EngineLoadError(f"{engine_dir}: not a directory (expected an engine built by build-engine)")
    if not path.is_file():
        raise EngineLoadError(f"{path}: missing (is {engine_dir} an engine directory built by build-engine?)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EngineLoadError(f"{path}: not valid JSON ({exc})") from None
    return parse_engine_config(raw, origin=str(path))


def is_engine_dir(path: str | Path) -> bool:
    """True when `path` looks like a Kiln engine (config.json with a format_version)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    if (Path(path) / "build_report.json").is_file() or (Path(path) / "rank0.safetensors").is_file():
        return True  # an engine, even if its config.json is broken (loading says what is wrong)
    try:
        return "format_version" in json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False
