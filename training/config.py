"""`FinetuneConfig`: every knob of a fine-tuning run, validated once at construction."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from training.errors import TrainingError

METHODS = ("lora", "full", "prompt-tuning", "p-tuning")
PROMPT_METHODS = ("prompt-tuning", "p-tuning")

# Learning rates that work for each method when the user gives none: adapters tolerate (and
# prompt embeddings need) much larger steps than the full set of weights.
DEFAULT_LR = {"lora": 2e-4, "full": 2e-5, "prompt-tuning": 3e-2, "p-tuning": 1e-3}

# Fields that must match between a run and the run it resumes: anything else may change
# (e.g. the number of epochs, to train longer).
RESUME_KEYS = ("model", "method", "template", "answer_field", "target_modules", "rank", "alpha",
               "num_virtual_tokens", "encoder_hidden_size", "batch_size", "grad_accum", "seed")


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run.

    `template` holds `{field}` placeholders filled from each jsonl record; the answer is
    `answer_field` (default: the last field of the template) and everything after it. With
    `answer_only_loss` the loss covers the answer and the EOS token only.
    `target_modules` (LoRA) is a regex matched in full against module names (`.*(q|v)_proj`),
    or a comma-separated list of module-name suffixes (`q_proj,v_proj`); None means every
    linear layer of the decoder (PEFT's `all-linear`).
    `lr` None picks `DEFAULT_LR[method]`.
    """

    model: Path
    data: Path
    output_dir: Path
    template: str
    method: str = "lora"
    val_data: Path | None = None
    answer_field: str | None = None
    answer_only_loss: bool = True
    target_modules: str | None = None
    rank: int = 8
    alpha: float = 16.0
    lora_dropout: float = 0.0
    num_virtual_tokens: int = 20
    encoder_hidden_size: int = 128
    epochs: int = 3
    lr: float | None = None
    weight_decay: float = 0.0
    batch_size: int = 8
    grad_accum: int = 1
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    max_seq_len: int = 512
    strict: bool = False
    resume: bool = False
    seed: int = 0
    exact_match_samples: int = 64

    def __post_init__(self) -> None:
        for name in ("model", "data", "output_dir", "val_data"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        if self.method not in METHODS:
            raise TrainingError(f"--method {self.method!r} is not one of {', '.join(METHODS)}")
        if not (self.model / "config.json").is_file():
            raise TrainingError(f"--model {self.model}: not a Hugging Face checkpoint directory (no config.json)")
        for flag, path in (("--data", self.data), ("--val-data", self.val_data)):
            if path is not None and not path.is_file():
                raise TrainingError(f"{flag} {path}: no such file")
        for flag, value in (("--rank", self.rank), ("--num-virtual-tokens", self.num_virtual_tokens),
                            ("--encoder-hidden-size", self.encoder_hidden_size), ("--epochs", self.epochs),
                            ("--batch-size", self.batch_size), ("--grad-accum", self.grad_accum),
                            ("--max-seq-len", self.max_seq_len)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise TrainingError(f"{flag} must be a positive integer, got {value!r}")
        if self.exact_match_samples < 0:
            raise TrainingError(f"--exact-match-samples must be >= 0, got {self.exact_match_samples}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise TrainingError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.lr is not None and not self.lr > 0:
            raise TrainingError(f"--lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise TrainingError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm <= 0:
            raise TrainingError(f"max_grad_norm must be positive, got {self.max_grad_norm}")
        if self.alpha <= 0:
            raise TrainingError(f"--alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise TrainingError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.method in PROMPT_METHODS and self.num_virtual_tokens >= self.max_seq_len:
            raise TrainingError(
                f"--num-virtual-tokens {self.num_virtual_tokens} leaves no room in --max-seq-len {self.max_seq_len}"
            )

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    @property
    def is_prompt_method(self) -> bool:
        return self.method in PROMPT_METHODS

    @property
    def num_reserved_tokens(self) -> int:
        """Positions taken by virtual tokens in front of every sequence (0 unless prompt tuning)."""
        return self.num_virtual_tokens if self.is_prompt_method else 0

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}

    def check_resumable_from(self, saved: dict[str, Any], origin: Path) -> None:
        """Raise if `saved` (a previous run's `to_dict()`) trained something else than this run would."""
        mine = self.to_dict()
        for key in RESUME_KEYS:
            if saved.get(key) != mine[key]:
                raise TrainingError(
                    f"--resume: {origin} was trained with {key}={saved.get(key)!r}, this run has "
                    f"{key}={mine[key]!r}; use the same setting or a new output directory"
                )

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
