"""Prompt-tuned tasks: `build-engine --prompt-table NAME=ADAPTER` stores each task's virtual
tokens; a request naming its task is answered exactly as PEFT's model answers, and requests of
different tasks and plain requests batch together."""

from __future__ import annotations

import pytest
from tiny_models import make_prompt_adapter
from transformers import AutoTokenizer

from engine import LLM, InvalidRequestError, SamplingParams
from engine.build.builder import BuildOptions, build_engine

PROMPTS = ["hello world", "Question: What is ML? Answer:", "the quick brown fox"]


def peft_greedy(peft_model, tok, prompt: str, n: int) -> list[int]:
    ids = tok(prompt, return_tensors="pt").input_ids
    out = peft_model.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tmp_path_factory):
    ckpt = tiny_checkpoint("llama-gqa")
    tmp = tmp_path_factory.mktemp("prompt-table")
    peft_a = make_prompt_adapter(ckpt, tmp / "task_a", num_virtual_tokens=4, seed=1)
    peft_b = make_prompt_adapter(ckpt, tmp / "task_b", num_virtual_tokens=7, seed=2)
    engine_dir = build_engine(ckpt, tmp / "engine", BuildOptions(
        dtype="float32", prompt_tables=(("a", str(tmp / "task_a")), ("b", str(tmp / "task_b")))), progress=False)
    return ckpt, engine_dir, peft_a, peft_b


def test_tasks_answer_like_peft_in_one_mixed_batch(setup):
    ckpt, engine_dir, peft_a, peft_b = setup
    tok = AutoTokenizer.from_pretrained(ckpt)
    llm = LLM(engine_dir, check_invariants=True)
    params = SamplingParams(max_tokens=12, min_tokens=12, temperature=0)
    tasks = ["a", "b", None, "b", "a", None]
    prompts = [PROMPTS[i % 3] for i in range(6)]
    outs = llm.generate(prompts, params, tasks=tasks)
    plain = llm.generate(PROMPTS, params)
    for prompt, task, out in zip(prompts, tasks, outs, strict=True):
        if task is None:
            assert out.token_ids == plain[PROMPTS.index(prompt)].token_ids
        else:
            assert out.token_ids == peft_greedy(peft_a if task == "a" else peft_b, tok, prompt, 12), (task, prompt)
            assert out.prompt_token_ids == tok(prompt).input_ids  # virtual tokens are not prompt tokens
    # Same text under different tasks gives different answers (the tasks are not mixed up).
    assert prompts[0] == prompts[3] and outs[0].token_ids != outs[3].token_ids
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_prefix_cache_never_crosses_tasks(setup):
    _, engine_dir, _, _ = setup
    long_prompt = "kernels engines serve requests in flight with paged attention caches " * 3
    params = SamplingParams(max_tokens=8, min_tokens=8, temperature=0)
    llm = LLM(engine_dir)
    a_first = llm.generate([long_prompt], params, tasks="a")[0].token_ids
    b_after_a = llm.generate([long_prompt], params, tasks="b")[0].token_ids
    b_cold = LLM(engine_dir, enable_prefix_caching=False).generate([long_prompt], params, tasks="b")[0].token_ids
    assert b_after_a == b_cold
    assert a_first != b_cold


def test_unknown_task_is_rejected(setup):
    _, engine_dir, _, _ = setup
    llm = LLM(engine_dir)
    with pytest.raises(InvalidRequestError, match="unknown task 'c'; this engine's tasks: a, b"):
        llm.generate(["hi"], SamplingParams(), tasks="c")
