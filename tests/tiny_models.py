"""Tiny real-architecture checkpoints with random weights, saved with `transformers`,
and a byte-level BPE tokenizer trained with `tokenizers` — nothing from a model hub.

`make_checkpoint(kind, out_dir)` writes a complete Hugging Face checkpoint directory
(config.json, model.safetensors, tokenizer files with a ChatML chat template).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus() -> list[str]:
    words = (
        "the quick brown fox jumps over a lazy dog while machine learning models generate text "
        "tokens batches kernels engines serve requests in flight with paged attention caches "
        "hello world question answer what is why how many numbers one two three four five six"
    ).split()
    lines = []
    for i in range(400):
        lines.append(" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)))
    lines += [
        "日本語のテキストと中文文本混合。机器学习模型。",
        "Emoji test 🚀🔥 are 👍🏽 and ✨ with café naïve résumé",
        "   leading spaces and\ttabs\nnew lines",
        "Question: What is ML? Answer: machine learning.",
    ] * 20
    return lines


def make_tokenizer(out_dir: Path, vocab_size: int = 384) -> Any:
    """Train a byte-level BPE tokenizer (GPT-2 style) and save it with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        bos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


# name -> (transformers config class name, overrides)
KINDS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-mha": ("LlamaConfig", {"num_key_value_heads": 4}),
    "llama-gqa": ("LlamaConfig", {"num_key_value_heads": 2}),
    "llama-mqa": ("LlamaConfig", {"num_key_value_heads": 1}),
    "llama3-rope": (
        "LlamaConfig",
        {
            "num_key_value_heads": 2,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
    "llama-untied": ("LlamaConfig", {"num_key_value_heads": 2, "tie_word_embeddings": False}),
    "mistral": ("MistralConfig", {"num_key_value_heads": 2, "sliding_window": None}),
    "qwen2": ("Qwen2Config", {"num_key_value_heads": 2}),
    "qwen3": ("Qwen3Config", {"num_key_value_heads": 2, "head_dim": 16}),
}


def make_checkpoint(kind: str, out_dir: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny random-weight checkpoint of the given kind (see KINDS) into out_dir."""
    import torch
    import transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(out)
    cls_name, kind_overrides = KINDS[kind]
    params: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    params.update(kind_overrides)
    params.update(overrides)
    config = getattr(transformers, cls_name)(**params)
    torch.manual_seed(seed)
    model_cls = {
        "LlamaConfig": transformers.LlamaForCausalLM,
        "MistralConfig": transformers.MistralForCausalLM,
        "Qwen2Config": transformers.Qwen2ForCausalLM,
        "Qwen3Config": transformers.Qwen3ForCausalLM,
    }[cls_name]
    model = model_cls(config).to(torch.float32)
    with torch.no_grad():
        # Larger-than-default weights so that logits are peaked and greedy choices well separated.
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.15 if "embed" not in name else 0.15)
            elif "norm" not in name:
                p.normal_(0.0, 0.05)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    (out / "kiln_tiny_kind.json").write_text(json.dumps({"kind": kind, "seed": seed}))
    return out


def make_prompt_adapter(checkpoint: str | Path, out_dir: str | Path, num_virtual_tokens: int, seed: int) -> Any:
    """Save a PEFT prompt-tuning adapter with a random (non-default) table; return the PEFT model."""
    import torch
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=num_virtual_tokens)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.normal_(0, 0.5)
    peft_model.save_pretrained(out_dir)
    return peft_model.eval()
