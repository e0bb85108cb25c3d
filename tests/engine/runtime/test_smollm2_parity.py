"""The embedded default model: Kiln's greedy output on SmolLM2-135M-Instruct (from its GGUF)
equals Hugging Face transformers' on the converted checkpoint, and is a sensible answer."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine import LLM, SamplingParams

QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is 2 + 2?"]


@pytest.fixture(scope="module")
def smollm2_engine(smollm2_checkpoint, tmp_path_factory):
    from engine.build.builder import BuildOptions, build_engine

    out = tmp_path_factory.mktemp("smollm2-engine") / "engine"
    return build_engine(smollm2_checkpoint, out, BuildOptions(dtype="float32", max_seq_len=512), progress=False)


def test_smollm2_greedy_equals_transformers(smollm2_checkpoint, smollm2_engine):
    tok = AutoTokenizer.from_pretrained(smollm2_checkpoint)
    hf = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint, dtype=torch.float32).eval()
    llm = LLM(smollm2_engine, check_invariants=True)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in QUESTIONS]
    outs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0))
    for prompt, out in zip(prompts, outs, strict=True):
        ids = tok(prompt, return_tensors="pt").input_ids
        ref = hf.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in ref:
            ref = ref[: ref.index(tok.eos_token_id) + 1]
        assert out.token_ids == ref, prompt
    assert "Paris" in outs[0].text
