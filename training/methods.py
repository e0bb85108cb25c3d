"""The four fine-tuning methods behind one interface: wrap a base model, save what was trained.

| method        | trainable                       | saved to OUT                                         |
|---------------|---------------------------------|------------------------------------------------------|
| lora          | low-rank A/B of target linears  | PEFT adapter (adapter_config.json + safetensors)     |
| prompt-tuning | virtual-token embeddings        | PEFT adapter (`prompt_embeddings`, (V, hidden))       |
| p-tuning      | MLP encoder of virtual tokens   | PEFT adapter (the encoder's output, (V, hidden))      |
| full          | every weight                    | HF checkpoint (config + model.safetensors)            |

The tokenizer is saved next to each output so that it is self-describing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from training.config import FinetuneConfig
from training.errors import TrainingError


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise TrainingError(
            "this method needs the `peft` package: pip install 'kiln-llm[train]'"
        ) from None
    return peft


def lora_target_modules(spec: str | None) -> str | list[str]:
    """`--target-modules` as PEFT takes it: a regex (full match), a list of name suffixes, or all-linear."""
    if spec is None or spec.strip() == "" or spec == "all-linear":
        return "all-linear"
    if re.fullmatch(r"[\w.]+(\s*,\s*[\w.]+)*", spec):
        return [name.strip() for name in spec.split(",")]
    try:
        re.compile(spec)
    except re.error as exc:
        raise TrainingError(f"--target-modules {spec!r} is not a valid regex: {exc}") from None
    return spec


def prepare_model(config: FinetuneConfig, base: torch.nn.Module) -> torch.nn.Module:
    """Return the trainable model for `config.method`; only the method's parameters require grad."""
    if config.method == "full":
        for p in base.parameters():
            p.requires_grad_(True)
        return base
    peft = _peft()
    peft_config: Any
    if config.method == "lora":
        peft_config = peft.LoraConfig(
            task_type="CAUSAL_LM",
            r=config.rank,
            lora_alpha=config.alpha,
            lora_dropout=config.lora_dropout,
            target_modules=lora_target_modules(config.target_modules),
        )
    elif config.method == "prompt-tuning":
        peft_config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=config.num_virtual_tokens)
    else:
        peft_config = peft.PromptEncoderConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=config.num_virtual_tokens,
            encoder_hidden_size=config.encoder_hidden_size,
        )
    try:
        model = peft.get_peft_model(base, peft_config)
    except ValueError as exc:
        if config.method == "lora":
            names = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)})
            raise TrainingError(
                f"--target-modules {config.target_modules!r} matches no layer of {config.model} "
                f"(linear layers are named {', '.join(names)}): {exc}"
            ) from None
        raise TrainingError(f"--method {config.method}: peft cannot wrap {config.model}: {exc}") from None
    return model


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter that training changes, by name (exactly what a resume must restore)."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor], origin: Path) -> None:
    params = dict(model.named_parameters())
    expected = {name for name, p in params.items() if p.requires_grad}
    if set(state) != expected:
        raise TrainingError(
            f"--resume: {origin} holds different trainable weights than this run creates "
            f"({len(set(state) ^ expected)} names differ); was it written by another version?"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            if params[name].shape != tensor.shape:
                raise TrainingError(f"--resume: {origin}: {name} has shape {tuple(tensor.shape)}, "
                                    f"this run has {tuple(params[name].shape)}")
            params[name].copy_(tensor)


def save_output(model: Any, tokenizer: Any, out_dir: Path, method: str, dtype: torch.dtype) -> None:
    """Write the usable result of training into `out_dir` (see the module table).

    `dtype` is the base checkpoint's dtype: a full checkpoint is saved in it, whatever dtype
    training used for its master weights.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if method == "full":
        state = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
        model.save_pretrained(out_dir, state_dict=state)
    else:
        model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
