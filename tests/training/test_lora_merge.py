"""engine/build/lora.py: a merged checkpoint answers exactly like the PEFT model it came from."""

from __future__ import annotations

import json

import peft
import pytest
import torch
import transformers

from engine.build.lora import merge_lora
from engine.errors import CheckpointError
from training.data import PromptTemplate, load_dataset
from training.evaluate import greedy_completions


@pytest.fixture(scope="module")
def merged_dir(merged_checkpoint):
    return merged_checkpoint


@pytest.fixture(scope="module")
def val_prompts(kv_task, learner_checkpoint):
    tokenizer = transformers.AutoTokenizer.from_pretrained(learner_checkpoint)
    val = load_dataset(kv_task.val, tokenizer, PromptTemplate.parse(kv_task.template), max_seq_len=512)
    return [e.prompt for e in val.examples], [e.completion for e in val.examples]


def test_merged_checkpoint_gives_the_peft_models_greedy_outputs(merged_dir, lora_run, learner_checkpoint, val_prompts):
    prompts, answers = val_prompts
    tokenizer = transformers.AutoTokenizer.from_pretrained(merged_dir)
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    base = transformers.AutoModelForCausalLM.from_pretrained(learner_checkpoint, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(base, lora_run.output_dir)

    ids = tokenizer(prompts[:8], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(**ids).logits, peft_model(**ids).logits, rtol=1e-4, atol=1e-4)
    from_merged = greedy_completions(merged, tokenizer, prompts, max_new_tokens=6)
    assert from_merged == greedy_completions(peft_model, tokenizer, prompts, max_new_tokens=6)
    # ... and those outputs are the learned answers, not the base model's.
    assert sum(o.strip() == a for o, a in zip(from_merged, answers, strict=True)) >= 0.9 * len(answers)


def test_merged_directory_is_a_plain_checkpoint_with_tokenizer_and_record(merged_dir, lora_run, learner_checkpoint):
    names = {p.name for p in merged_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "kiln_merge.json"} <= names
    assert not any(n.startswith("adapter_") for n in names)
    assert (merged_dir / "tokenizer.json").read_bytes() == (learner_checkpoint / "tokenizer.json").read_bytes()
    record = json.loads((merged_dir / "kiln_merge.json").read_text())
    assert record["adapters"][0]["peft_type"] == "LORA" and record["adapters"][0]["r"] == 16
    assert record["adapters"][0]["path"] == str(lora_run.output_dir)


def test_only_lora_adapters_merge(learner_checkpoint, tmp_path):
    base = transformers.AutoModelForCausalLM.from_pretrained(learner_checkpoint)
    peft.get_peft_model(base, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).save_pretrained(
        tmp_path / "prompt")
    with pytest.raises(CheckpointError, match="adapter is PROMPT_TUNING, only LORA adapters can be merged"):
        merge_lora(learner_checkpoint, tmp_path / "prompt", tmp_path / "out")
    with pytest.raises(CheckpointError, match="not a PEFT adapter"):
        merge_lora(learner_checkpoint, tmp_path, tmp_path / "out")


def test_an_adapter_for_another_model_shape_is_refused_by_name(lora_run, tiny_checkpoint, tmp_path):
    # lora_run was trained on a 128-wide model; the session's tiny checkpoint is 64 wide.
    with pytest.raises(CheckpointError, match="does not fit .*size mismatch"):
        merge_lora(tiny_checkpoint("llama-gqa"), lora_run.output_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_merge_will_not_write_into_a_non_empty_directory(lora_run, learner_checkpoint, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(CheckpointError, match="exists and is not an empty directory"):
        merge_lora(learner_checkpoint, lora_run.output_dir, tmp_path / "taken")
