"""`kiln finetune` (LoRA / full SFT / prompt tuning / p-tuning from jsonl) and `kiln merge`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer


def register(app: typer.Typer) -> None:
    @app.command(no_args_is_help=True)
    def finetune(
        model: Path = typer.Option(..., "--model", help="Hugging Face checkpoint directory to fine-tune."),
        data: Path = typer.Option(..., "--data", help="Training records, one JSON object per line."),
        template: str = typer.Option(
            ..., "--template", help='e.g. "Question: {question} Answer: {answer}"; the answer field and the '
            "text after it are what the model learns to produce."),
        output: Path = typer.Option(..., "-o", "--output", help="Output directory (adapter or checkpoint)."),
        val_data: Path | None = typer.Option(None, "--val-data", help="Validation records (loss and exact match "
                                             "each epoch; picks the best checkpoint)."),
        method: str = typer.Option("lora", "--method", help="lora | full | prompt-tuning | p-tuning"),
        target_modules: str | None = typer.Option(
            None, "--target-modules", help="LoRA: regex over module names, or 'q_proj,v_proj' "
            "(default: every linear layer)."),
        rank: int = typer.Option(8, "--rank", help="LoRA rank."),
        alpha: float = typer.Option(16.0, "--alpha", help="LoRA alpha (scale = alpha / rank)."),
        lora_dropout: float = typer.Option(0.0, "--lora-dropout"),
        num_virtual_tokens: int = typer.Option(20, "--num-virtual-tokens", help="Prompt/p-tuning virtual tokens."),
        encoder_hidden_size: int = typer.Option(128, "--encoder-hidden-size", help="P-tuning MLP width."),
        epochs: int = typer.Option(3, "--epochs"),
        lr: float | None = typer.Option(None, "--lr", help="Peak learning rate (default depends on --method)."),
        weight_decay: float = typer.Option(0.0, "--weight-decay", help="AdamW weight decay."),
        batch_size: int = typer.Option(8, "--batch-size"),
        grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimizer step."),
        warmup_ratio: float = typer.Option(0.05, "--warmup-ratio", help="Fraction of steps of linear warmup."),
        max_seq_len: int = typer.Option(512, "--max-seq-len", help="Longer records are skipped."),
        answer_field: str | None = typer.Option(None, "--answer-field", help="Default: the template's last field."),
        answer_only_loss: bool = typer.Option(True, "--answer-only-loss/--no-answer-only-loss"),
        strict: bool = typer.Option(False, "--strict", help="Fail on any bad record instead of skipping it."),
        resume: bool = typer.Option(False, "--resume", help="Continue the run saved in OUTPUT/last."),
        seed: int = typer.Option(0, "--seed"),
        exact_match_samples: int = typer.Option(
            64, "--exact-match-samples", help="Validation records checked by greedy generation (0: off)."),
        threads: int | None = typer.Option(
            None, "--threads", help="CPU threads for torch (default: torch's choice; on a busy machine "
            "fewer threads than cores avoid contention)."),
    ) -> None:
        """Fine-tune a checkpoint on jsonl records; writes a PEFT adapter (or full checkpoint) to OUTPUT."""
        from training.config import FinetuneConfig
        from training.errors import TrainingError
        from training.trainer import finetune as run_finetune

        if threads is not None:
            if threads <= 0:
                raise TrainingError(f"--threads must be a positive integer, got {threads}")
            import torch

            torch.set_num_threads(threads)

        config = FinetuneConfig(
            model=model, data=data, output_dir=output, template=template, method=method, val_data=val_data,
            answer_field=answer_field, answer_only_loss=answer_only_loss, target_modules=target_modules,
            rank=rank, alpha=alpha, lora_dropout=lora_dropout, num_virtual_tokens=num_virtual_tokens,
            encoder_hidden_size=encoder_hidden_size, epochs=epochs, lr=lr, weight_decay=weight_decay,
            batch_size=batch_size, grad_accum=grad_accum, warmup_ratio=warmup_ratio, max_seq_len=max_seq_len,
            strict=strict, resume=resume, seed=seed, exact_match_samples=exact_match_samples,
        )
        result = run_finetune(config, show_progress=True)
        _print_summary(result.log, result.output_dir)

    @app.command(no_args_is_help=True)
    def merge(
        base: Path = typer.Argument(..., help="Base Hugging Face checkpoint directory."),
        adapter: Path = typer.Argument(..., help="PEFT LoRA adapter directory (e.g. a `kiln finetune` output)."),
        output: Path = typer.Option(..., "-o", "--output", help="New directory for the merged checkpoint."),
    ) -> None:
        """Fold a LoRA adapter into a checkpoint (safetensors, config and tokenizer files)."""
        from rich.console import Console

        from engine.build.lora import merge_lora

        out = merge_lora(base, adapter, output)
        Console().print(f"merged [bold]{adapter}[/] into [bold]{base}[/] -> {out}")


def _print_summary(log: dict[str, Any], output_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for split in ("train", "val"):
        skipped = log["skipped"][split]
        if skipped:
            shown = "; ".join(f"line {s['line']}: {s['reason']}" for s in skipped[:5])
            more = f" (and {len(skipped) - 5} more)" if len(skipped) > 5 else ""
            console.print(f"[yellow]skipped {len(skipped)} {split} record(s):[/] {shown}{more}", highlight=False)
    table = Table(title=f"finetune: {log['config']['method']} on {log['device']} ({log['autocast_dtype']})")
    for column in ("epoch", "step", "train loss", "val loss", "val exact match", "best"):
        table.add_column(column, justify="right")
    for e in log["epochs"]:
        table.add_row(
            str(e["epoch"]), str(e["step"]), f"{e['train_loss']:.4f}",
            f"{e['val_loss']:.4f}" if "val_loss" in e else "-",
            f"{e['val_exact_match']:.1%}" if "val_exact_match" in e else "-",
            "*" if e["best"] else "",
        )
    console.print(table)
    before = log["val_exact_match_before"]
    after = log["val_exact_match_best"]
    if before is not None and after is not None:
        console.print(f"val exact match: {before:.1%} before -> {after:.1%} (best epoch {log['best_epoch']})")
    console.print(
        f"{log['completed_steps']} steps, {log['train_tokens']:,} tokens in {log['train_time_s']:.1f} s "
        f"({log['tokens_per_s']:,.0f} tokens/s); trainable params {log['num_trainable_params']:,} "
        f"of {log['num_params']:,}"
    )
    console.print(f"best model -> {output_dir}   curves -> {output_dir / 'train_log.json'}")
