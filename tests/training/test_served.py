"""The fine-tuned model served: LoRA merged -> build-engine -> Kiln's LLM and a real tritonserver
answer the held-out prompts exactly as the PEFT model does in transformers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import peft
import pytest
import torch
import transformers

from engine import LLM, SamplingParams
from engine.build.builder import BuildOptions, build_engine
from serving.triton.launcher import TritonServer
from serving.triton.repository import write_model_repository
from training.data import PromptTemplate, load_dataset
from training.evaluate import greedy_completions

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def engine_dir(merged_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    options = BuildOptions(dtype="float32", max_seq_len=64, max_batch_size=64)
    return build_engine(merged_checkpoint, tmp_path_factory.mktemp("engines") / "kv", options, progress=False)


@pytest.fixture(scope="module")
def held_out(kv_task, lora_run, learner_checkpoint) -> tuple[list[str], list[str], list[str]]:
    """(prompts, reference answers, the PEFT model's greedy answers) of the held-out phrasings."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(learner_checkpoint)
    val = load_dataset(kv_task.val, tokenizer, PromptTemplate.parse(kv_task.template), max_seq_len=512)
    base = transformers.AutoModelForCausalLM.from_pretrained(learner_checkpoint, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, lora_run.output_dir)
    prompts = [e.prompt for e in val.examples]
    return prompts, [e.completion for e in val.examples], greedy_completions(model, tokenizer, prompts, MAX_TOKENS)


def _accuracy(outputs: list[str], answers: list[str]) -> float:
    return sum(o.strip() == a for o, a in zip(outputs, answers, strict=True)) / len(answers)


def test_kiln_engine_answers_like_the_peft_model(engine_dir, held_out):
    prompts, answers, peft_outputs = held_out
    llm = LLM(engine_dir)
    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    texts = [o.text for o in outs]
    assert texts == peft_outputs
    assert _accuracy(texts, answers) >= 0.9


@pytest.fixture(scope="module")
def triton(engine_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    repo = tmp_path_factory.mktemp("kv-repo")
    write_model_repository(engine_dir, repo)
    with TritonServer(repo) as server:
        yield server


def test_triton_serves_the_held_out_answers(triton, held_out):
    prompts, answers, peft_outputs = held_out
    url = f"{triton.http_url}/v2/models/ensemble/generate"
    texts = []
    with httpx.Client(timeout=60) as client:
        for prompt in prompts:
            response = client.post(url, json={"text_input": prompt, "max_tokens": MAX_TOKENS,
                                              "exclude_input_in_output": True})
            assert response.status_code == 200, response.text
            texts.append(response.json()["text_output"])
    assert texts == peft_outputs
    assert _accuracy(texts, answers) >= 0.9
