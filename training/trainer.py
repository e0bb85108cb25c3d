"""The fine-tuning loop, top to bottom: data -> model -> AdamW + warmup/cosine -> epochs -> outputs.

    OUT/                      the best model (lowest validation loss; lowest training loss
                              without --val-data): a PEFT adapter or a full checkpoint, + tokenizer
    OUT/train_log.json        curves: per-step loss/lr/tokens/s, per-epoch train/val loss, summary
    OUT/finetune_config.json  the run's settings
    OUT/last/                 resumable checkpoint (see training/checkpoint.py)

Loss is the mean cross-entropy over answer tokens of a whole accumulation group (each
micro-batch's summed loss is divided by the group's total answer-token count), so gradient
accumulation gives the same update as one big batch. Mixed precision: bf16 autocast over fp32
master weights on CUDA, plain fp32 on CPU. Ctrl-C finishes the current optimizer step, saves
OUT/last and raises TrainingInterrupted; `resume=True` continues from OUT/last exactly.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from training.checkpoint import LAST_DIR, TrainState, load_checkpoint, save_checkpoint
from training.config import FinetuneConfig
from training.data import Dataset, PromptTemplate, collate, load_dataset
from training.errors import TrainingError, TrainingInterrupted
from training.evaluate import answer_token_loss, exact_match, validation_loss
from training.methods import prepare_model, save_output

LOG_FILE = "train_log.json"


@dataclass(frozen=True)
class FinetuneResult:
    output_dir: Path
    log: dict[str, Any]
    train_skipped: int
    val_skipped: int


StepCallback = Callable[[dict[str, Any]], None]


def pick_device() -> tuple[torch.device, torch.dtype | None]:
    """The device to train on and the autocast dtype (None = plain fp32)."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.device("cpu"), None


def finetune(config: FinetuneConfig, show_progress: bool = True, on_step: StepCallback | None = None) -> FinetuneResult:
    """Run `config` to completion (or to Ctrl-C) and return where the outputs went and the log.

    `on_step` is called after each optimizer step with that step's log record.
    """
    import transformers

    out = config.output_dir
    _check_output_dir(out, config.resume)
    torch.manual_seed(config.seed)
    device, autocast_dtype = pick_device()

    tokenizer = transformers.AutoTokenizer.from_pretrained(config.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    template = PromptTemplate.parse(config.template, config.answer_field, allow_virtual_marker=config.is_prompt_method)
    train_set = _load(config, config.data, tokenizer, template, "--data")
    val_set = _load(config, config.val_data, tokenizer, template, "--val-data") if config.val_data else None

    try:
        base = transformers.AutoModelForCausalLM.from_pretrained(config.model, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise TrainingError(f"--model {config.model}: transformers cannot load it: {exc}") from None
    saved_dtype = _checkpoint_dtype(base)
    model = prepare_model(config, base).to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    batches_per_epoch = math.ceil(len(train_set) / config.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
    total_steps = steps_per_epoch * config.epochs
    scheduler = transformers.get_cosine_schedule_with_warmup(
        optimizer, num_warmup_steps=int(config.warmup_ratio * total_steps), num_training_steps=total_steps
    )

    out.mkdir(parents=True, exist_ok=True)
    if config.resume:
        state = load_checkpoint(out, config, model, optimizer, scheduler)
    else:
        state = TrainState()
        if val_set is not None and config.exact_match_samples:
            state.exact_match_before = exact_match(model, tokenizer, val_set.examples[: config.exact_match_samples])
    config.save(out / "finetune_config.json")

    pad_id = tokenizer.pad_token_id
    header = {
        "device": device.type,
        "autocast_dtype": str(autocast_dtype).removeprefix("torch.") if autocast_dtype else "float32",
        "num_params": sum(p.numel() for p in model.parameters()),
        "num_trainable_params": sum(p.numel() for p in params),
        "num_train_records": len(train_set),
        "num_val_records": len(val_set) if val_set else 0,
        "skipped": {"train": [asdict(s) for s in train_set.skipped],
                    "val": [asdict(s) for s in val_set.skipped] if val_set else []},
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
    }

    with _progress(show_progress, total_steps, state.step) as advance, _graceful_interrupt() as interrupted:
        for epoch in range(state.epoch, config.epochs):
            order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(config.seed + epoch))
            batches = [order[i:i + config.batch_size].tolist() for i in range(0, len(order), config.batch_size)]
            groups = [batches[i:i + config.grad_accum] for i in range(0, len(batches), config.grad_accum)]
            for group in groups[state.step_in_epoch:]:
                record = _optimizer_step(model, optimizer, scheduler, params, train_set, group, pad_id,
                                         device, autocast_dtype, config, state, epoch)
                advance(record)
                if on_step is not None:
                    on_step(record)
                if interrupted() and state.step < total_steps:
                    save_checkpoint(out, config, model, optimizer, scheduler, state)
                    _write_log(out, config, header, state)
                    raise TrainingInterrupted(
                        f"interrupted at step {state.step}/{total_steps}; checkpoint saved in {out / LAST_DIR}, "
                        "rerun with --resume to continue"
                    )
            _end_epoch(model, tokenizer, optimizer, scheduler, config, state, epoch, val_set, pad_id,
                       device, autocast_dtype, saved_dtype)

    log = _write_log(out, config, header, state)
    return FinetuneResult(out, log, len(train_set.skipped), len(val_set.skipped) if val_set else 0)


def _optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    params: list[torch.nn.Parameter],
    train_set: Dataset,
    group: list[list[int]],
    pad_id: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    config: FinetuneConfig,
    state: TrainState,
    epoch: int,
) -> dict[str, Any]:
    """One optimizer step over an accumulation group of micro-batches; updates `state`."""
    start = time.perf_counter()
    micro_batches = [collate([train_set.examples[i] for i in idx], pad_id) for idx in group]
    group_label_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
    group_loss, group_tokens = 0.0, 0
    for batch in micro_batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss_sum, _ = answer_token_loss(logits, batch["labels"])
        (loss_sum / group_label_tokens).backward()
        group_loss += loss_sum.item()
        group_tokens += int(batch["attention_mask"].sum())
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - start

    state.step += 1
    state.step_in_epoch += 1
    state.epoch_loss_sum += group_loss
    state.epoch_loss_tokens += group_label_tokens
    state.train_time_s += elapsed
    state.train_tokens += group_tokens
    record = {
        "step": state.step,
        "epoch": epoch + 1,
        "loss": group_loss / max(group_label_tokens, 1),
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens": group_tokens,
        "tokens_per_s": group_tokens / elapsed,
    }
    state.steps.append(record)
    return record


def _end_epoch(
    model: torch.nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    config: FinetuneConfig,
    state: TrainState,
    epoch: int,
    val_set: Dataset | None,
    pad_id: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    saved_dtype: torch.dtype,
) -> None:
    """Validate, keep the best model in OUT, save OUT/last and reset the epoch counters."""
    train_loss = state.epoch_loss_sum / max(state.epoch_loss_tokens, 1)
    entry: dict[str, Any] = {"epoch": epoch + 1, "step": state.step, "train_loss": train_loss}
    if val_set is not None:
        entry["val_loss"] = validation_loss(model, val_set.examples, pad_id, config.batch_size, device, autocast_dtype)
        if config.exact_match_samples:
            entry["val_exact_match"] = exact_match(model, tokenizer, val_set.examples[: config.exact_match_samples])
    metric = entry.get("val_loss", train_loss)
    entry["best"] = state.best_metric is None or metric < state.best_metric
    if entry["best"]:
        state.best_metric, state.best_epoch = metric, epoch + 1
        save_output(model, tokenizer, config.output_dir, config.method, saved_dtype)
    state.epochs.append(entry)
    state.epoch, state.step_in_epoch = epoch + 1, 0
    state.epoch_loss_sum, state.epoch_loss_tokens = 0.0, 0
    save_checkpoint(config.output_dir, config, model, optimizer, scheduler, state)


def _write_log(out: Path, config: FinetuneConfig, header: dict[str, Any], state: TrainState) -> dict[str, Any]:
    best = next((e for e in state.epochs if e["epoch"] == state.best_epoch), None)
    log = {
        "config": config.to_dict(),
        **header,
        "completed_epochs": state.epoch,
        "completed_steps": state.step,
        "train_time_s": state.train_time_s,
        "train_tokens": state.train_tokens,
        "tokens_per_s": state.train_tokens / state.train_time_s if state.train_time_s else 0.0,
        "best_epoch": state.best_epoch,
        "best_metric": "val_loss" if config.val_data else "train_loss",
        "val_exact_match_before": state.exact_match_before,
        "val_exact_match_best": best.get("val_exact_match") if best else None,
        "epochs": state.epochs,
        "steps": state.steps,
    }
    (out / LOG_FILE).write_text(json.dumps(log, indent=1) + "\n")
    return log


def _load(config: FinetuneConfig, path: Path, tokenizer: Any, template: PromptTemplate, flag: str) -> Dataset:
    return load_dataset(path, tokenizer, template, config.max_seq_len, config.answer_only_loss, config.strict,
                        config.num_reserved_tokens, flag)


def _check_output_dir(out: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise TrainingError(f"-o {out}: exists and is not a directory")
    if resume:
        if not (out / LAST_DIR).is_dir():
            raise TrainingError(f"--resume: {out / LAST_DIR} does not exist; nothing to resume")
    elif out.is_dir() and any(out.iterdir()):
        raise TrainingError(f"-o {out}: directory is not empty; pass --resume to continue its run or pick a new one")


def _checkpoint_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype the checkpoint was stored in (loading upcast it to fp32 for training)."""
    dtype = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


@contextmanager
def _progress(enabled: bool, total: int, completed: int) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A rich progress bar showing loss and tokens/s; yields `advance(step_record)`."""
    if not enabled:
        yield lambda record: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("[bold]finetune"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tps]:,.0f} tok/s"))
    with Progress(*columns) as progress:
        task = progress.add_task("finetune", total=total, completed=completed, loss=float("nan"), tps=0.0)

        def advance(record: dict[str, Any]) -> None:
            progress.update(task, advance=1, loss=record["loss"], tps=record["tokens_per_s"])

        yield advance


@contextmanager
def _graceful_interrupt() -> Iterator[Callable[[], bool]]:
    """Turn the first Ctrl-C into a flag checked between optimizer steps (a second one kills)."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag.is_set
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        if flag.is_set():
            raise KeyboardInterrupt
        flag.set()

    signal.signal(signal.SIGINT, handler)
    try:
        yield flag.is_set
    finally:
        signal.signal(signal.SIGINT, previous)
