"""Kiln's greedy tokens and prefill logits equal Hugging Face transformers' for every
supported architecture and attention layout, with prompts of mixed lengths in one batch."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine import LLM, SamplingParams

KINDS = ["llama-mha", "llama-gqa", "llama-mqa", "llama3-rope", "llama-untied", "mistral", "qwen2", "qwen3"]
PROMPTS = [
    "hello world",
    "the quick brown fox jumps over",
    "Question: What is ML? Answer:",
    "a",
    "machine learning models generate text tokens batches kernels engines serve requests in flight with paged",
    "日本語のテキスト",
    "Emoji 🚀🔥 test",
    "one two three four five six seven",
    "   leading spaces",
]


def hf_greedy(hf, tok, prompt: str, max_new: int, min_new: int = 0) -> list[int]:
    ids = tok(prompt, return_tensors="pt").input_ids
    out = hf.generate(ids, max_new_tokens=max_new, min_new_tokens=min_new, do_sample=False,
                      pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
    # HF pads finished sequences; Kiln stops at (and includes) the EOS token.
    if tok.eos_token_id in out:
        out = out[: out.index(tok.eos_token_id) + 1]
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_tokens_and_logits_match_transformers(kind, tiny_checkpoint, tiny_engine):
    ckpt = tiny_checkpoint(kind)
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    llm = LLM(tiny_engine(kind), check_invariants=True)

    # min_tokens bans EOS like HF's min_new_tokens, so all 24 tokens are compared.
    forced = llm.generate(PROMPTS, SamplingParams(max_tokens=24, min_tokens=24, temperature=0))
    natural = llm.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0))
    for prompt, out_forced, out_natural in zip(PROMPTS, forced, natural, strict=True):
        assert out_forced.token_ids == hf_greedy(hf, tok, prompt, 24, 24), prompt
        assert out_natural.token_ids == hf_greedy(hf, tok, prompt, 24), prompt
    assert len({tuple(o.token_ids) for o in forced}) == len(PROMPTS)  # outputs are not degenerate

    ids = tok(PROMPTS[4]).input_ids
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    ours = llm.engine.score(ids)
    assert (ours - ref).abs().max().item() <= 1e-4
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
