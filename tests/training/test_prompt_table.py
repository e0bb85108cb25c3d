"""engine/build/prompt_table.py: the stored virtual tokens reproduce PEFT's output when prepended."""

from __future__ import annotations

import peft
import pytest
import torch
import transformers

from engine.build.prompt_table import load_prompt_embeddings
from engine.errors import CheckpointError

NUM_VIRTUAL = 5


def _peft_config(kind: str):
    if kind == "prompt-tuning":
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=NUM_VIRTUAL)
    return peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=NUM_VIRTUAL, encoder_hidden_size=32)


@pytest.fixture(scope="module")
def base_dir(tiny_checkpoint):
    return tiny_checkpoint("llama-gqa")


@pytest.fixture(scope="module")
def tokenizer(base_dir):
    return transformers.AutoTokenizer.from_pretrained(base_dir)


def _base(base_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("kind", ["prompt-tuning", "p-tuning"])
def test_virtual_tokens_prepended_to_the_prompt_embeddings_reproduce_peft(kind, base_dir, tokenizer, tmp_path):
    torch.manual_seed(3)
    trained = peft.get_peft_model(_base(base_dir), _peft_config(kind))
    # Move the virtual tokens away from their initialisation, as training would.
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    trained.save_pretrained(tmp_path / "adapter")
    trained.eval()

    virtual = load_prompt_embeddings(tmp_path / "adapter")  # (V, hidden)
    base = _base(base_dir)
    assert virtual.shape == (NUM_VIRTUAL, base.config.hidden_size)

    ids = tokenizer("Question: what is the quick fox? Answer: ", return_tensors="pt")["input_ids"]  # (1, T)
    with torch.no_grad():
        embeds = base.get_input_embeddings()(ids)  # (1, T, hidden)
        by_hand = base(inputs_embeds=torch.cat([virtual[None], embeds], dim=1)).logits  # (1, V+T, vocab)
        reloaded = peft.PeftModel.from_pretrained(_base(base_dir), tmp_path / "adapter").eval()
        from_saved = reloaded(input_ids=ids).logits  # (1, V+T, vocab)
        # For p-tuning the in-memory model runs its MLP encoder; the file holds that output.
        from_training = trained(input_ids=ids).logits

    assert by_hand.shape[1] == NUM_VIRTUAL + ids.shape[1]
    torch.testing.assert_close(from_saved, by_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_training, by_hand, rtol=1e-5, atol=1e-5)
    # The virtual tokens are not a no-op: without them the prompt's logits differ.
    plain = base(input_ids=ids).logits
    assert not torch.allclose(plain, by_hand[:, NUM_VIRTUAL:], atol=1e-3)


def test_a_lora_adapter_is_not_a_prompt_table(base_dir, tmp_path):
    model = peft.get_peft_model(_base(base_dir), peft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules="all-linear"))
    model.save_pretrained(tmp_path / "lora")
    with pytest.raises(CheckpointError, match="adapter is LORA, not one of PROMPT_TUNING, P_TUNING"):
        load_prompt_embeddings(tmp_path / "lora")
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        load_prompt_embeddings(tmp_path / "missing")
