"""Measuring a fine-tuned model: validation loss and greedy exact-match with `transformers`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from training.data import IGNORE_INDEX, Example, collate


def answer_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions, and their count.

    logits: (B, T', vocab) where T' >= T; when T' > T (prompt tuning prepends T' - T virtual
    tokens) the last T positions are the ones aligned with `labels` (B, T).
    """
    logits = logits[:, -labels.shape[1]:, :]  # (B, T, vocab)
    shift_logits = logits[:, :-1, :].float()  # (B, T-1, vocab): position t predicts token t+1
    shift_labels = labels[:, 1:]  # (B, T-1)
    loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, int((shift_labels != IGNORE_INDEX).sum())


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module,
    examples: Sequence[Example],
    pad_token_id: int,
    batch_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """Mean cross-entropy per answer token over `examples`."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size], pad_token_id).items()}
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss, n = answer_token_loss(logits, batch["labels"])
        total += float(loss)
        count += n
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def greedy_completions(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 16, batch_size: int = 64
) -> list[str]:
    """Greedy continuation of each prompt until EOS or `max_new_tokens`, special tokens removed.

    Each step re-runs the model over the right-padded batch (no KV cache: answers here are a few
    tokens) and reads every row's logits at its own last real token. With causal attention, a
    row never sees the padding after it, so each result equals that prompt decoded alone — for
    a PEFT prompt-tuned model too, whose virtual tokens come first in every row.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        rows = [list(tokenizer(p, add_special_tokens=True)["input_ids"]) for p in prompts[start:start + batch_size]]
        lengths = torch.tensor([len(r) for r in rows], device=device)  # (B,)
        width = int(lengths.max()) + max_new_tokens
        ids = torch.full((len(rows), width), pad, dtype=torch.long, device=device)  # (B, W)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        prompt_lengths = lengths.clone()
        done = torch.zeros(len(rows), dtype=torch.bool, device=device)  # (B,)
        arange = torch.arange(len(rows), device=device)
        for _ in range(max_new_tokens):
            cur = int(lengths.max())
            mask = (torch.arange(cur, device=device)[None, :] < lengths[:, None]).long()  # (B, cur)
            logits = model(input_ids=ids[:, :cur], attention_mask=mask).logits  # (B, V + cur, vocab)
            offset = logits.shape[1] - cur  # virtual tokens in front (prompt tuning), else 0
            next_ids = logits[arange, offset + lengths - 1].argmax(-1)  # (B,)
            active = ~done
            ids[arange[active], lengths[active]] = next_ids[active]
            lengths = lengths + active.long()
            if eos is not None:
                done |= next_ids == eos
            if bool(done.all()):
                break
        for i in range(len(rows)):
            new = ids[i, int(prompt_lengths[i]): int(lengths[i])].tolist()
            texts.append(tokenizer.decode(new, skip_special_tokens=True))
    model.train(was_training)
    return texts


def exact_match(model: Any, tokenizer: Any, examples: Sequence[Example], max_new_tokens: int | None = None) -> float:
    """Fraction of examples whose greedy completion equals their reference completion (both stripped)."""
    if not examples:
        return 0.0
    if max_new_tokens is None:
        max_new_tokens = max(len(tokenizer(e.completion, add_special_tokens=False)["input_ids"]) for e in examples) + 2
    outputs = greedy_completions(model, tokenizer, [e.prompt for e in examples], max_new_tokens)
    hits = sum(out.strip() == e.completion.strip() for out, e in zip(outputs, examples, strict=True))
    return hits / len(examples)
