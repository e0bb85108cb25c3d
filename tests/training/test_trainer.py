"""training/trainer.py: it learns, logs, keeps the best, accumulates exactly and resumes exactly."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

from training.config import FinetuneConfig
from training.data import PromptTemplate, load_dataset
from training.errors import TrainingError, TrainingInterrupted
from training.evaluate import exact_match
from training.trainer import finetune

# --- LoRA on the key -> value task (the shared run of conftest.py) -------------------------------


def test_lora_lifts_held_out_exact_match_from_zero_to_90_percent(lora_run, learner_checkpoint, kv_task):
    log = lora_run.log
    assert log["val_exact_match_before"] <= 0.05
    assert log["val_exact_match_best"] >= 0.9
    # The adapter written to OUT is the one that scores: reload it and measure independently.
    tokenizer = transformers.AutoTokenizer.from_pretrained(lora_run.output_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(learner_checkpoint, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, lora_run.output_dir)
    val = load_dataset(kv_task.val, tokenizer, PromptTemplate.parse(kv_task.template), max_seq_len=512)
    assert exact_match(model, tokenizer, val.examples) == pytest.approx(log["val_exact_match_best"])


def test_train_log_holds_the_curves_and_the_best_epoch_is_the_lowest_val_loss(lora_run):
    log = json.loads((lora_run.output_dir / "train_log.json").read_text())
    assert log["completed_steps"] == log["total_steps"] == len(log["steps"])
    assert [e["epoch"] for e in log["epochs"]] == list(range(1, log["config"]["epochs"] + 1))
    assert log["epochs"][-1]["train_loss"] < log["epochs"][0]["train_loss"] / 5
    best = min(log["epochs"], key=lambda e: e["val_loss"])
    assert log["best_epoch"] == best["epoch"] and log["best_metric"] == "val_loss"
    assert all(s["tokens_per_s"] > 0 and s["lr"] >= 0 for s in log["steps"])
    assert log["tokens_per_s"] == pytest.approx(log["train_tokens"] / log["train_time_s"])
    # Warmup then cosine: the learning rate rises, peaks at --lr, and decays towards zero.
    lrs = [s["lr"] for s in log["steps"]]
    assert max(lrs) == pytest.approx(log["config"]["lr"]) and lrs[-1] < 0.01 * max(lrs)
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "last/trainable.safetensors"):
        assert (lora_run.output_dir / name).is_file(), name


# --- Small runs on the session's tiny checkpoint ----------------------------------------------------


def _config(tiny_checkpoint, kv_task, out: Path, **overrides) -> FinetuneConfig:
    settings = dict(model=tiny_checkpoint("llama-gqa"), data=kv_task.train, output_dir=out, template=kv_task.template,
                    epochs=2, lr=3e-3, batch_size=8, exact_match_samples=0)
    settings.update(overrides)
    return FinetuneConfig(**settings)


def test_gradient_accumulation_equals_one_big_batch(tiny_checkpoint, kv_task, tmp_path):
    # 4 micro-batches of 4 with accumulation and one batch of 16 see the same 16 records per step.
    big = finetune(_config(tiny_checkpoint, kv_task, tmp_path / "big", epochs=1, batch_size=16), show_progress=False)
    acc = finetune(_config(tiny_checkpoint, kv_task, tmp_path / "acc", epochs=1, batch_size=4, grad_accum=4),
                   show_progress=False)
    assert big.log["total_steps"] == acc.log["total_steps"]
    # The same records per step in a different grouping; losses and weights agree up to float error.
    big_w = load_file(str(tmp_path / "big" / "last" / "trainable.safetensors"))
    acc_w = load_file(str(tmp_path / "acc" / "last" / "trainable.safetensors"))
    assert big_w.keys() == acc_w.keys()
    for name in big_w:
        torch.testing.assert_close(acc_w[name], big_w[name], rtol=1e-4, atol=1e-5)


def test_ctrl_c_saves_a_checkpoint_and_resume_continues_exactly(tiny_checkpoint, kv_task, tmp_path):
    straight = finetune(_config(tiny_checkpoint, kv_task, tmp_path / "straight"), show_progress=False)

    def interrupt_at_step_5(record):
        if record["step"] == 5:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, caught by the trainer's handler

    broken = _config(tiny_checkpoint, kv_task, tmp_path / "broken")
    with pytest.raises(TrainingInterrupted, match=r"interrupted at step 5/\d+.*--resume"):
        finetune(broken, show_progress=False, on_step=interrupt_at_step_5)
    assert json.loads((tmp_path / "broken" / "last" / "trainer_state.json").read_text())["step"] == 5

    resumed = finetune(_config(tiny_checkpoint, kv_task, tmp_path / "broken", resume=True), show_progress=False)
    assert [s["loss"] for s in resumed.log["steps"]] == pytest.approx([s["loss"] for s in straight.log["steps"]])
    a = load_file(str(tmp_path / "straight" / "last" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "broken" / "last" / "trainable.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)


def test_output_directory_rules(tiny_checkpoint, kv_task, tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "something").write_text("x")
    with pytest.raises(TrainingError, match="directory is not empty; pass --resume"):
        finetune(_config(tiny_checkpoint, kv_task, tmp_path / "used"), show_progress=False)
    with pytest.raises(TrainingError, match="--resume: .*last does not exist"):
        finetune(_config(tiny_checkpoint, kv_task, tmp_path / "fresh", resume=True), show_progress=False)


def test_resume_refuses_a_run_with_other_settings(tiny_checkpoint, kv_task, tmp_path):
    finetune(_config(tiny_checkpoint, kv_task, tmp_path / "run", epochs=1), show_progress=False)
    with pytest.raises(TrainingError, match="was trained with rank=8, this run has rank=4"):
        finetune(_config(tiny_checkpoint, kv_task, tmp_path / "run", epochs=2, rank=4, resume=True),
                 show_progress=False)


def test_target_modules_regex_selects_layers_and_a_miss_names_the_flag(tiny_checkpoint, kv_task, tmp_path):
    finetune(_config(tiny_checkpoint, kv_task, tmp_path / "qv", epochs=1, target_modules=r".*\.(q_proj|v_proj)"),
             show_progress=False)
    names = load_file(str(tmp_path / "qv" / "adapter_model.safetensors")).keys()
    assert names and all(".q_proj." in n or ".v_proj." in n for n in names)
    assert any(".v_proj." in n for n in names)
    with pytest.raises(TrainingError, match="--target-modules '.*nothing_like_this' matches no layer"):
        finetune(_config(tiny_checkpoint, kv_task, tmp_path / "miss", target_modules=".*nothing_like_this"),
                 show_progress=False)


def test_full_finetune_writes_a_loadable_checkpoint_that_moved(tiny_checkpoint, kv_task, tmp_path):
    result = finetune(_config(tiny_checkpoint, kv_task, tmp_path / "full", method="full", lr=1e-3,
                              val_data=kv_task.val), show_progress=False)
    out = result.output_dir
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert (out / "tokenizer.json").is_file() and not (out / "adapter_config.json").exists()
    tuned = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama-gqa"), dtype=torch.float32)
    assert not torch.equal(tuned.model.layers[0].mlp.down_proj.weight, base.model.layers[0].mlp.down_proj.weight)
    epochs = result.log["epochs"]
    assert epochs[-1]["val_loss"] < epochs[0]["val_loss"]
    assert result.log["num_trainable_params"] == result.log["num_params"]
