"""Virtual-token embeddings of a PEFT prompt-tuning / p-tuning adapter, ready to serve.

How PEFT (0.21, causal LMs) uses them, and so how a runtime must:

* The V virtual-token embeddings are concatenated in front of the *embedded* prompt, before
  everything the tokenizer produced — a BOS token included:
  `inputs_embeds = cat(virtual (V, hidden), embed_tokens(input_ids) (T, hidden))`.
* They take positions 0..V-1; the prompt's tokens follow at V..V+T-1 (RoPE positions count them).
  The attention mask is extended with V ones; they are ordinary causal-attention tokens whose
  K/V sit in the cache like any prompt token's.
* They are not scaled or normalized: the tensor is used as-is (for a Llama-family model no
  embedding scale applies either).
* Prompt tuning stores the trained embedding table itself; p-tuning trains an MLP encoder, and
  PEFT's `save_pretrained` already runs that encoder once and stores its output. Either way the
  file holds `prompt_embeddings`, shape (V * num_transformer_submodules, hidden); for a
  decoder-only model num_transformer_submodules is 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from engine.errors import CheckpointError

PROMPT_PEFT_TYPES = ("PROMPT_TUNING", "P_TUNING")


def load_prompt_embeddings(adapter_dir: str | Path) -> torch.Tensor:
    """Return the adapter's virtual-token embeddings, (num_virtual_tokens, hidden), float32.

    Raises CheckpointError if `adapter_dir` is not a PEFT prompt-tuning / p-tuning adapter
    with safetensors weights, or if the stored tensor's shape disagrees with its config.
    """
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    weights_path = adapter_dir / "adapter_model.safetensors"
    if not config_path.is_file():
        raise CheckpointError(f"{adapter_dir}: not a PEFT adapter (no adapter_config.json)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path}: invalid JSON: {exc}") from None
    peft_type = config.get("peft_type")
    if peft_type not in PROMPT_PEFT_TYPES:
        raise CheckpointError(
            f"{adapter_dir}: adapter is {peft_type}, not one of {', '.join(PROMPT_PEFT_TYPES)}"
            + (" (merge LoRA adapters into the weights instead)" if peft_type == "LORA" else "")
        )
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise CheckpointError(f"{config_path}: task_type is {config.get('task_type')}, expected CAUSAL_LM")
    if not weights_path.is_file():
        raise CheckpointError(f"{adapter_dir}: no adapter_model.safetensors (Kiln does not load pickles)")
    with safe_open(str(weights_path), framework="pt") as f:
        if "prompt_embeddings" not in f.keys():
            raise CheckpointError(f"{weights_path}: no 'prompt_embeddings' tensor (keys: {sorted(f.keys())})")
        table = f.get_tensor("prompt_embeddings")  # (V * submodules, hidden)
    num_virtual = config.get("num_virtual_tokens")
    token_dim = config.get("token_dim")
    if table.dim() != 2 or table.shape[0] < (num_virtual or 0) or (token_dim and table.shape[1] != token_dim):
        raise CheckpointError(
            f"{weights_path}: prompt_embeddings has shape {tuple(table.shape)}, config says "
            f"num_virtual_tokens={num_virtual}, token_dim={token_dim}"
        )
    # PEFT feeds the first num_virtual_tokens rows to a decoder-only model (the rest, if any,
    # belong to an encoder-decoder's second submodule).
    return table[:num_virtual].to(torch.float32).contiguous()  # (V, hidden)


def write_prompt_table(engine_dir: str | Path, tasks: tuple[tuple[str, str], ...]) -> Path:
    """Store each task's virtual-token embeddings in `<engine>/prompt_table.safetensors` (in the
    engine's dtype) and record the tasks in config.json's `source.prompt_tasks`."""
    from safetensors.torch import save_file

    from engine.config import load_engine_config
    from engine.errors import BuildError
    from engine.runtime.model_runner import TORCH_DTYPES
    from engine.runtime.weights import PROMPT_TABLE_FILE

    engine_dir = Path(engine_dir)
    config = load_engine_config(engine_dir)
    dtype = TORCH_DTYPES[config.build.dtype]
    table: dict[str, torch.Tensor] = {}
    for name, adapter in tasks:
        if not name or ":" in name:
            raise BuildError(f"--prompt-table: task name {name!r} must be non-empty and contain no ':'")
        if name in table:
            raise BuildError(f"--prompt-table: task {name!r} given twice")
        embeddings = load_prompt_embeddings(adapter)  # (V, hidden)
        if embeddings.shape[1] != config.model.hidden_size:
            raise BuildError(
                f"--prompt-table {name}={adapter}: embeddings have width {embeddings.shape[1]}, the model's "
                f"hidden size is {config.model.hidden_size} (adapter trained for another model?)"
            )
        table[name] = embeddings.to(dtype).contiguous()
    path = engine_dir / PROMPT_TABLE_FILE
    save_file(table, str(path))
    source = dict(config.source)
    source["prompt_tasks"] = {name: str(Path(adapter).resolve()) for name, adapter in tasks}
    type(config)(architecture=config.architecture, model=config.model, build=config.build, source=source,
                 format_version=config.format_version).save(engine_dir)
    return path
