"""`build_engine`: a Hugging Face (or GGUF) checkpoint -> a Kiln engine directory.

The engine directory (DESIGN.md §1)::

    config.json         EngineConfig: architecture, model hyper-parameters, build limits, source hashes
    rank0.safetensors   weights under Kiln's names (engine/build/transforms.py), in the build dtype
    rank{r}.safetensors with --tp N: rank r's slices (engine/build/sharding.py), r = 0..N-1
    tokenizer.json, tokenizer_config.json, special_tokens_map.json, chat_template.jinja,
    generation_config.json   copied from the checkpoint (those it has)
    build_report.json   build seconds, bytes per rank, parameter count, dtype

The engine is assembled in a hidden staging directory next to the target and moved into place
at the end, so a failed or interrupted build never leaves a half-written engine behind.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from engine.build.checkpoint import HFCheckpoint, read_json, sha256_file
from engine.build.lora import MERGE_RECORD
from engine.build.options import BuildOptions
from engine.build.prompt_table import write_prompt_table
from engine.build.sharding import check_tp_split, shard_tensor
from engine.build.transforms import iter_kiln_tensors, model_config_from_hf, plan
from engine.build.writer import SafetensorsWriter
from engine.config import DTYPES, BuildConfig, EngineConfig, ModelConfig, QuantConfig, is_engine_dir
from engine.errors import BuildError, CheckpointError

DEFAULT_MAX_SEQ_LEN_CAP = 4096
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
# Files from which `transformers` can derive a tokenizer.json when a checkpoint lacks one.
SLOW_TOKENIZER_FILES = ("tokenizer.model", "vocab.json")
__all__ = ["BuildOptions", "build_engine"]

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def build_engine(
    checkpoint: str | Path,
    output_dir: str | Path | None = None,
    options: BuildOptions = BuildOptions(),
    progress: bool = True,
) -> Path:
    """Build a Kiln engine from a HF checkpoint directory or a `.gguf` file; return its directory.

    Without `output_dir` the engine goes to `engines/<checkpoint name>-<dtype>-tp<N>/` under the
    current directory. An existing output directory is replaced only if it is a Kiln engine.
    Raises CheckpointError (bad input) or BuildError (bad options, output in the way).
    """
    start = time.perf_counter()
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise CheckpointError(f"{checkpoint}: no such file or directory")
    if output_dir is not None:
        _check_output(Path(output_dir))  # before a possibly long GGUF conversion
    if options.lora:
        return _build_with_lora(checkpoint, output_dir, options, progress)
    out = _build_any(checkpoint, output_dir, options, progress, start)
    if options.prompt_tables:
        write_prompt_table(out, options.prompt_tables)
    return out


def _build_with_lora(checkpoint: Path, output_dir: str | Path | None, options: BuildOptions, progress: bool) -> Path:
    """Merge the LoRA adapters into a temporary checkpoint (engine/build/lora.py), then build it
    under the base checkpoint's name."""
    import tempfile

    from engine.build.lora import merge_lora

    if not checkpoint.is_dir():
        raise BuildError(f"--lora needs a Hugging Face checkpoint directory as the base, got {checkpoint}")
    with tempfile.TemporaryDirectory(prefix="kiln-lora-") as tmp:
        merged = checkpoint
        for i, adapter in enumerate(options.lora):
            merged = merge_lora(merged, Path(adapter), Path(tmp) / f"merged{i}")
        named = Path(tmp) / checkpoint.resolve().name
        merged.rename(named)
        if output_dir is None:
            output_dir = Path.cwd() / "engines" / f"{named.name}-lora-{_resolve_dtype_name(named, options)}-tp{options.tp_size}"
        return build_engine(named, output_dir, replace(options, lora=()), progress)


def _resolve_dtype_name(checkpoint_dir: Path, options: BuildOptions) -> str:
    config = read_json(checkpoint_dir / "config.json") or {}
    return _resolve_dtype(options.dtype, config)


def _build_any(checkpoint: Path, output_dir: str | Path | None, options: BuildOptions, progress: bool,
               start: float) -> Path:
    if checkpoint.is_file() and checkpoint.suffix == ".gguf":
        from engine.build.gguf import gguf_as_hf_checkpoint

        with gguf_as_hf_checkpoint(checkpoint, progress=progress) as hf_dir:
            source = {"checkpoint": str(checkpoint.resolve()), "format": "gguf",
                      "files": {checkpoint.name: sha256_file(checkpoint)}, "adapters": []}
            return _build(hf_dir, checkpoint.stem, output_dir, options, progress, source, start)
    if checkpoint.is_file():
        raise CheckpointError(
            f"{checkpoint}: expected a Hugging Face checkpoint directory or a .gguf file"
        )
    return _build(checkpoint, checkpoint.resolve().name, output_dir, options, progress, None, start)


def _build(
    checkpoint_dir: Path,
    name: str,
    output_dir: str | Path | None,
    options: BuildOptions,
    show_progress: bool,
    source: dict[str, Any] | None,
    start: float,
) -> Path:
    """Build from a HF checkpoint dir; `source` overrides its provenance (a GGUF file), `start` is
    when the whole build began (perf_counter), for build_report.json."""
    if options.quantization != "none":  # ModelOpt calibration + accuracy gate, then back here
        from engine.build.quantize import build_quantized

        return build_quantized(checkpoint_dir, name, output_dir, options, show_progress, source, start)
    with HFCheckpoint(checkpoint_dir) as ckpt:
        arch, model = model_config_from_hf(ckpt.config, ckpt.generation_config)
        dtype = _resolve_dtype(options.dtype, ckpt.config)
        build = _build_config(options, model, dtype)
        tp = options.tp_size
        quant = _quant_config(checkpoint_dir, options)
        check_tp_split(model, tp, quant)
        build = replace(build, quantization=quant)
        suffix = "" if quant.algo == "none" else f"-{quant.algo}"
        out = Path(output_dir) if output_dir is not None else Path.cwd() / "engines" / f"{name}-{dtype}{suffix}-tp{tp}"
        _check_output(out)
        if source is None:
            source = {
                "checkpoint": str(checkpoint_dir.resolve()),
                "format": "safetensors",
                "files": {p.name: sha256_file(p) for p in _source_files(ckpt)},
                **_merged_adapters(checkpoint_dir),
            }
        with _staging_dir(out) as staging:
            paths = [staging / f"rank{r}.safetensors" for r in range(tp)]
            num_parameters, bytes_per_rank = _write_weights(ckpt, arch, model, TORCH_DTYPES[dtype], paths,
                                                            show_progress, quant)
            _copy_tokenizer(checkpoint_dir, staging)
            EngineConfig(architecture=arch, model=model, build=build, source=source).save(staging)
            report = {
                "build_seconds": round(time.perf_counter() - start, 3),
                "bytes_per_rank": {p.name: n for p, n in zip(paths, bytes_per_rank, strict=True)},
                "num_parameters": num_parameters,
                "dtype": dtype,
                "architecture": arch,
                "quantization": quant.algo,
            }
            (staging / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return out


def _merged_adapters(checkpoint_dir: Path) -> dict[str, Any]:
    """`adapters` (and `merged_base`) for a checkpoint that `kiln merge` made from base + LoRA adapters."""
    record = read_json(checkpoint_dir / MERGE_RECORD, required=False)
    if record is None:
        return {"adapters": []}
    adapters = record.get("adapters")
    if not isinstance(adapters, list):
        raise CheckpointError(f"{checkpoint_dir / MERGE_RECORD}: 'adapters' must be a list")
    return {"adapters": adapters, "merged_base": record.get("base")}


def _source_files(ckpt: HFCheckpoint) -> list[Path]:
    """Every checkpoint file the engine is made of: weights, configs and tokenizer files."""
    tokenizer = [ckpt.path / name for name in TOKENIZER_FILES if (ckpt.path / name).is_file()]
    return sorted(set(ckpt.files()) | set(tokenizer))


def _resolve_dtype(requested: str, hf_config: dict[str, Any]) -> str:
    """`auto` = the checkpoint's `dtype`/`torch_dtype` when Kiln supports it, else float32."""
    if requested != "auto":
        return requested
    stored = hf_config.get("dtype") or hf_config.get("torch_dtype")
    return stored if stored in DTYPES else "float32"


def _build_config(options: BuildOptions, model: ModelConfig, dtype: str) -> BuildConfig:
    max_pos = model.max_position_embeddings
    max_seq_len = options.max_seq_len or min(max_pos, DEFAULT_MAX_SEQ_LEN_CAP)
    if max_seq_len > max_pos:
        raise BuildError(
            f"--max-seq-len {max_seq_len} exceeds the model's context of {max_pos} tokens "
            "(max_position_embeddings, or the sliding window)"
        )
    return BuildConfig(
        dtype=dtype,
        tp_size=options.tp_size,
        max_batch_size=options.max_batch_size,
        max_seq_len=max_seq_len,
        max_num_tokens=options.max_num_tokens or max(2048, max_seq_len),
        kv_block_size=options.kv_block_size,
    )


def _check_output(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise BuildError(f"{out}: exists and is not a directory; choose another output with -o")
    if out.is_dir() and any(out.iterdir()) and not is_engine_dir(out):
        raise BuildError(
            f"{out}: exists and is not a Kiln engine directory; refusing to overwrite it (choose another -o)"
        )


@contextmanager
def _staging_dir(out: Path) -> Iterator[Path]:
    """Yield a fresh hidden directory next to `out`; on success it replaces `out`, else it is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _quant_config(checkpoint_dir: Path, options: BuildOptions) -> QuantConfig:
    """The engine's quantization: read from a ModelOpt checkpoint's hf_quant_config.json, else none;
    plus the requested KV-cache dtype."""
    from engine.quant.modelopt_format import is_modelopt_checkpoint, read_modelopt_quant_config

    quant = read_modelopt_quant_config(checkpoint_dir) if is_modelopt_checkpoint(checkpoint_dir) else QuantConfig()
    # "auto" keeps a ModelOpt checkpoint's vocab tables as its authors left them (unquantized);
    # Kiln's own quantized builds resolve "auto" before they get here (engine/build/quantize.py).
    embedding = "none" if options.embedding_quant == "auto" else options.embedding_quant
    if embedding != "none" and quant.algo == "none":
        raise BuildError(f"--embedding-quant {embedding} needs quantized weights (--fp8, --int8, --int4-awq, --w8a8 "
                         "or a ModelOpt checkpoint)")
    return replace(quant, kv_cache_dtype=options.kv_cache_dtype, embedding=embedding)


def _write_weights(
    ckpt: HFCheckpoint, arch: str, model: ModelConfig, dtype: torch.dtype, paths: list[Path], show_progress: bool,
    quant: QuantConfig | None = None,
) -> tuple[int, list[int]]:
    """Stream Kiln tensors into one file per tensor-parallel rank (`paths[r]` gets rank r's
    slices, engine/build/sharding.py); return (unsharded parameter count, bytes per rank)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    total = len(plan(arch, model))
    columns = (TextColumn("[bold]converting tensors"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    tp = len(paths)
    num_parameters = 0
    with Progress(*columns, disable=not show_progress, transient=False) as bar, ExitStack() as stack:
        writers = [stack.enter_context(SafetensorsWriter(p)) for p in paths]
        task = bar.add_task("convert", total=total)
        if quant is not None and quant.algo != "none":  # ModelOpt layouts (engine/quant/modelopt_format.py)
            from engine.quant.modelopt_format import iter_quantized_kiln_tensors

            for kiln_name, tensor in iter_quantized_kiln_tensors(arch, model, quant, dtype, ckpt.get,
                                                                 set(ckpt.tensor_names())):
                num_parameters += tensor.numel()
                for rank, writer in enumerate(writers):
                    writer.add(kiln_name, shard_tensor(kiln_name, tensor, model, tp, rank))
                if not kiln_name.endswith(("weight_scale", "pre_quant_scale")):
                    bar.advance(task)
            return num_parameters, [w.num_bytes for w in writers]
        for kiln_name, tensor in iter_kiln_tensors(arch, model, ckpt.get, set(ckpt.tensor_names())):
            tensor = tensor.to(dtype)
            num_parameters += tensor.numel()
            for rank, writer in enumerate(writers):
                writer.add(kiln_name, shard_tensor(kiln_name, tensor, model, tp, rank))
            bar.advance(task)
    return num_parameters, [w.num_bytes for w in writers]


def _copy_tokenizer(checkpoint_dir: Path, engine_dir: Path) -> None:
    """Copy the tokenizer files; derive tokenizer.json with transformers when only slow files exist."""
    for file_name in TOKENIZER_FILES:
        if (checkpoint_dir / file_name).is_file():
            shutil.copy2(checkpoint_dir / file_name, engine_dir / file_name)
    if (engine_dir / "tokenizer.json").is_file():
        return
    if not any((checkpoint_dir / f).is_file() for f in SLOW_TOKENIZER_FILES):
        raise CheckpointError(
            f"{checkpoint_dir}: no tokenizer (expected tokenizer.json, or one of {list(SLOW_TOKENIZER_FILES)})"
        )
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_dir), use_fast=True)
    except Exception as exc:  # transformers raises many types for unreadable tokenizer files
        raise CheckpointError(f"{checkpoint_dir}: cannot convert its tokenizer to tokenizer.json ({exc})") from None
    tokenizer.save_pretrained(str(engine_dir))
    if not (engine_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"{checkpoint_dir}: its tokenizer has no fast (tokenizer.json) form")
