"""Turning logits into next tokens: penalties, bans, temperature, top-k/top-p/min-p, seeds.

Order of processing for each row (vLLM's order): bad words and min_tokens bans ->
repetition penalty (prompt + output tokens) -> presence/frequency penalties (output tokens)
-> log-probabilities are taken here -> greedy argmax, or temperature -> top-k -> top-p ->
min-p -> sample. A request with a `seed` draws from its own generator, so its tokens do not
depend on what it is batched with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.runtime.sequence import Sequence

NEG_INF = float("-inf")


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float] | None  # log-probability of each sampled token (None if nobody asked)
    top_logprobs: list[dict[int, float] | None]


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: tuple[int, ...]) -> SampleResult:
        """logits: (S, V) float32 on any device, one row per sequence in `seqs`."""
        logits = logits.float()
        for row, seq in enumerate(seqs):
            self._apply_bans_and_penalties(logits, row, seq, eos_token_ids)

        want_logprobs = any(seq.params.logprobs is not None for seq in seqs)
        logprobs_all = torch.log_softmax(logits, dim=-1) if want_logprobs else None

        greedy_rows = [i for i, seq in enumerate(seqs) if seq.params.greedy]
        tokens = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
        if greedy_rows:
            idx = torch.tensor(greedy_rows, device=logits.device)
            tokens[idx] = logits[idx].argmax(dim=-1)
        for i, seq in enumerate(seqs):
            if not seq.params.greedy:
                tokens[i] = self._sample_row(logits[i], seq)

        token_list = tokens.tolist()
        if logprobs_all is None:
            return SampleResult(token_list, None, [None] * len(seqs))
        chosen = logprobs_all.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
        top: list[dict[int, float] | None] = []
        for i, seq in enumerate(seqs):
            n = seq.params.logprobs
            if n:
                values, ids = logprobs_all[i].topk(n)
                top.append(dict(zip(ids.tolist(), values.tolist(), strict=True)))
            else:
                top.append(None)
        return SampleResult(token_list, chosen, top)

    def _apply_bans_and_penalties(self, logits: torch.Tensor, row: int, seq: Sequence,
                                  eos_token_ids: tuple[int, ...]) -> None:
        params = seq.params
        row_logits = logits[row]  # (V,) view
        vocab = row_logits.shape[0]
        output = seq.output_token_ids
        if len(output) < params.min_tokens:
            banned = [t for t in (*eos_token_ids, *params.stop_token_ids) if 0 <= t < vocab]
            if banned:
                row_logits[banned] = NEG_INF
        for word in seq.bad_words_token_ids:
            prefix, last = word[:-1], word[-1]
            if not prefix or (len(output) >= len(prefix) and output[-len(prefix):] == prefix):
                row_logits[last] = NEG_INF
        if params.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.real_token_ids)), dtype=torch.long, device=logits.device)
            values = row_logits[seen]
            p = params.repetition_penalty
            row_logits[seen] = torch.where(values > 0, values / p, values * p)
        if (params.presence_penalty or params.frequency_penalty) and output:
            counts = torch.bincount(torch.tensor(output, device=logits.device), minlength=vocab)[:vocab]
            row_logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)

    def _sample_row(self, row_logits: torch.Tensor, seq: Sequence) -> int:
        """row_logits: (V,) processed logits -> one sampled token id."""
        params = seq.params
        logits = row_logits / params.temperature
        if params.top_k > 0 and params.top_k < logits.shape[0]:
            kth = torch.topk(logits, params.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, NEG_INF)
        probs = torch.softmax(logits, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, sorted_ids = probs.sort(descending=True)
            cumulative = sorted_probs.cumsum(0)
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            remove = cumulative - sorted_probs >= params.top_p
            sorted_probs[remove] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, sorted_ids, sorted_probs)
        if params.min_p > 0.0:
            probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
        generator = seq.generator or self.generator
        if probs.device.type != "cpu":
            # Draw on the CPU so seeded results are device-independent.
            probs = probs.cpu()
        return int(torch.multinomial(probs, 1, generator=generator).item())
