"""The resumable checkpoint `OUT/last/`: everything needed to continue a run bit for bit.

    OUT/last/
      trainable.safetensors   # every parameter that requires grad, by name
      optimizer.pt            # AdamW + LR-scheduler state and the torch RNG (tensors and numbers
                              # only: read back with torch.load(weights_only=True), never unpickled)
      trainer_state.json      # TrainState: epoch, step, best so far, the curves logged so far
      finetune_config.json    # the run's FinetuneConfig

It is written to `last.tmp/` and renamed, so a crash while saving leaves the previous one intact.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from training.config import FinetuneConfig
from training.errors import TrainingError
from training.methods import load_trainable_state, trainable_state

LAST_DIR = "last"


@dataclass
class TrainState:
    """Progress of a run. `step` counts optimizer steps; `step_in_epoch` those of the current epoch."""

    epoch: int = 0
    step: int = 0
    step_in_epoch: int = 0
    epoch_loss_sum: float = 0.0
    epoch_loss_tokens: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    train_time_s: float = 0.0
    train_tokens: int = 0
    steps: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    exact_match_before: float | None = None


def save_checkpoint(
    out_dir: Path,
    config: FinetuneConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainState,
) -> Path:
    final = out_dir / LAST_DIR
    tmp = out_dir / f"{LAST_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()},
        tmp / "optimizer.pt",
    )
    (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=1) + "\n")
    config.save(tmp / "finetune_config.json")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def load_checkpoint(
    out_dir: Path,
    config: FinetuneConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> TrainState:
    """Restore a run saved by `save_checkpoint` into freshly built objects; returns its TrainState."""
    last = out_dir / LAST_DIR
    needed = ("trainable.safetensors", "optimizer.pt", "trainer_state.json", "finetune_config.json")
    missing = [name for name in needed if not (last / name).is_file()]
    if missing:
        raise TrainingError(
            f"--resume: no complete checkpoint in {last} (missing {', '.join(missing)}); "
            "run without --resume to start afresh"
        )
    config.check_resumable_from(json.loads((last / "finetune_config.json").read_text()), last)
    load_trainable_state(model, load_file(str(last / "trainable.safetensors")), last)
    extra = torch.load(last / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["rng"])
    return TrainState(**json.loads((last / "trainer_state.json").read_text()))
