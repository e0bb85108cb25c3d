"""Fixtures of the training tests: the key -> value task, a checkpoint able to learn it, and one
LoRA run on it shared by the trainer, merge, engine and Triton tests."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tiny_models import make_checkpoint

from training.config import FinetuneConfig
from training.synthetic import TEMPLATE, write_task
from training.trainer import FinetuneResult, finetune

# The LoRA run the end-to-end tests share (see test_trainer.py for what it must achieve).
LORA_SETTINGS = dict(method="lora", epochs=14, lr=4e-3, batch_size=10, rank=16, alpha=32.0, exact_match_samples=50)


@dataclass(frozen=True)
class KVTask:
    train: Path
    val: Path
    template: str = TEMPLATE


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models train fastest on one thread; on a shared 2-core machine, more threads only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def kv_task(tmp_path_factory: pytest.TempPathFactory) -> KVTask:
    train, val = write_task(tmp_path_factory.mktemp("kv-task"), num_keys=50, seed=0)
    return KVTask(train, val)


@pytest.fixture(scope="session")
def learner_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (GQA), twice the default width: enough for LoRA to learn 50 keys in ~350 steps."""
    return make_checkpoint("llama-gqa", tmp_path_factory.mktemp("ckpt-learner"), hidden_size=128,
                           intermediate_size=256)


@pytest.fixture(scope="session")
def lora_run(learner_checkpoint: Path, kv_task: KVTask, tmp_path_factory: pytest.TempPathFactory) -> FinetuneResult:
    torch.set_num_threads(1)
    config = FinetuneConfig(model=learner_checkpoint, data=kv_task.train, val_data=kv_task.val,
                            output_dir=tmp_path_factory.mktemp("lora-run") / "out", template=kv_task.template,
                            **LORA_SETTINGS)
    return finetune(config, show_progress=False)


@pytest.fixture(scope="session")
def merged_checkpoint(lora_run: FinetuneResult, learner_checkpoint: Path,
                      tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`lora_run`'s adapter folded into the learner checkpoint by `merge_lora`."""
    from engine.build.lora import merge_lora

    return merge_lora(learner_checkpoint, lora_run.output_dir, tmp_path_factory.mktemp("merged") / "ckpt")
