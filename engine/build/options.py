"""`BuildOptions`: what a build was asked for, validated once (no torch import, so CLI flag
errors are instant)."""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import DTYPES, EMBEDDING_QUANTS, KV_CACHE_DTYPES, QUANT_ALGOS
from engine.errors import BuildError


@dataclass(frozen=True)
class BuildOptions:
    """What `build-engine` was asked for. `None` limits are derived from the checkpoint:
    max_seq_len = min(max_position_embeddings, 4096), max_num_tokens = max(2048, max_seq_len)."""

    dtype: str = "auto"
    max_batch_size: int = 64
    max_seq_len: int | None = None
    max_num_tokens: int | None = None
    kv_block_size: int = 16
    tp_size: int = 1
    # Quantization (engine/build/quantize.py): algo none|fp8|int8_wo|int4_awq|w8a8_sq.
    quantization: str = "none"
    kv_cache_dtype: str = "auto"
    group_size: int | None = None
    calib_data: str | None = None
    calib_size: int = 32
    accuracy_budget: float | None = None
    force: bool = False
    export_hf: str | None = None
    # Vocab tables (embedding / LM head): "auto" = int8 for --int8, --int4-awq and --w8a8 builds
    # calibrated here, unquantized otherwise (and for ModelOpt checkpoints made elsewhere).
    embedding_quant: str = "auto"
    # SmoothQuant migration strength for --w8a8 (None: ModelOpt's default).
    smoothquant_alpha: float | None = None
    # LoRA adapters (PEFT) merged into the checkpoint before anything else, in order.
    lora: tuple[str, ...] = ()
    # Prompt-tuned tasks served by the engine: (task name, PEFT prompt-tuning/p-tuning adapter dir).
    prompt_tables: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise BuildError(f"--dtype {self.dtype!r} is not one of {['auto', *DTYPES]}")
        for flag, value in (
            ("--max-batch-size", self.max_batch_size),
            ("--max-seq-len", self.max_seq_len),
            ("--max-num-tokens", self.max_num_tokens),
            ("--kv-block-size", self.kv_block_size),
            ("--tp", self.tp_size),
        ):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise BuildError(f"{flag} must be a positive integer, got {value!r}")
        self._check_quantization()

    def _check_quantization(self) -> None:
        if self.quantization not in QUANT_ALGOS:
            raise BuildError(f"quantization {self.quantization!r} is not one of {list(QUANT_ALGOS)}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise BuildError(f"--kv-cache-dtype {self.kv_cache_dtype!r} is not one of {list(KV_CACHE_DTYPES)}")
        if self.group_size is not None:
            if self.quantization != "int4_awq":
                raise BuildError("--group-size applies only to --int4-awq")
            if not isinstance(self.group_size, int) or self.group_size <= 0 or self.group_size % 32:
                raise BuildError(f"--group-size must be a positive multiple of 32, got {self.group_size!r}")
        if self.embedding_quant not in ("auto", *EMBEDDING_QUANTS):
            raise BuildError(f"--embedding-quant {self.embedding_quant!r} is not one of {['auto', *EMBEDDING_QUANTS]}")
        if self.smoothquant_alpha is not None:
            if self.quantization != "w8a8_sq":
                raise BuildError("--smoothquant-alpha applies only to --w8a8")
            if not 0.0 <= self.smoothquant_alpha <= 1.0:
                raise BuildError(f"--smoothquant-alpha must be in [0, 1], got {self.smoothquant_alpha!r}")
        if self.calib_size <= 0:
            raise BuildError(f"--calib-size must be a positive integer, got {self.calib_size!r}")
        if self.accuracy_budget is not None and not self.accuracy_budget >= 1.0:
            raise BuildError(f"--accuracy-budget is a perplexity ratio >= 1.0, got {self.accuracy_budget!r}")
        if self.quantization == "none":
            for flag, given in (("--calib-data", self.calib_data is not None),
                                ("--accuracy-budget", self.accuracy_budget is not None),
                                ("--export-hf", self.export_hf is not None), ("--force", self.force)):
                if given:
                    raise BuildError(f"{flag} needs a weight quantization (--fp8, --int8, --int4-awq or --w8a8)")
