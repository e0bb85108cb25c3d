"""`build-engine CKPT [-o ENGINE_DIR] [options]`: a HF checkpoint dir or .gguf file -> Kiln engine.

Every flag is a parameter of `build` below and maps 1:1 onto a field of
`engine.build.builder.BuildOptions` in `_options()`: to add a flag, add both.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from cli.errors import run_cli

app = typer.Typer(
    name="build-engine",
    help="Build a Kiln engine directory from a Hugging Face checkpoint directory or a .gguf file.",
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()


def _options(**flags: Any) -> Any:
    """The one place CLI flags become BuildOptions (validated there, errors name the flag)."""
    from engine.build.options import BuildOptions

    return BuildOptions(**flags)


@app.command()
def build(
    checkpoint: Annotated[Path, typer.Argument(help="HF checkpoint directory (safetensors) or a .gguf file.")],
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Engine directory (default: engines/<name>-<dtype>-tp<N>)")
    ] = None,
    dtype: Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16 (auto = checkpoint's dtype)")] = "auto",
    max_batch_size: Annotated[int, typer.Option(help="Most sequences decoded together.")] = 64,
    max_seq_len: Annotated[
        int | None, typer.Option(help="Longest prompt + output (default: min(max_position_embeddings, 4096))")
    ] = None,
    max_num_tokens: Annotated[
        int | None, typer.Option(help="Token budget per engine step (default: max(2048, max_seq_len))")
    ] = None,
    kv_block_size: Annotated[int, typer.Option(help="Tokens per paged KV-cache block.")] = 16,
    tp: Annotated[int, typer.Option("--tp", help="Tensor-parallel ranks.")] = 1,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No progress bar.")] = False,
    fp8: Annotated[bool, typer.Option("--fp8", help="FP8 (e4m3) weights, quantized with ModelOpt.")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="int8 weight-only (per-channel).")] = False,
    int4_awq: Annotated[bool, typer.Option("--int4-awq", help="int4 AWQ weights (group 128).")] = False,
    w8a8: Annotated[bool, typer.Option("--w8a8", help="SmoothQuant int8 weights and activations.")] = False,
    kv_cache_dtype: Annotated[str, typer.Option(help="auto | fp8 | int8 (KV-cache storage)")] = "auto",
    group_size: Annotated[int | None, typer.Option(help="--int4-awq group size (default 128).")] = None,
    calib_data: Annotated[
        str | None, typer.Option(help="Calibration text (.txt paragraphs or .jsonl 'text'); default ships.")
    ] = None,
    calib_size: Annotated[int, typer.Option(help="Calibration samples (256 tokens each).")] = 32,
    accuracy_budget: Annotated[
        float | None, typer.Option(help="Largest perplexity ratio allowed (default 1.02 fp8/int8, 1.06 int4/w8a8).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Keep the engine even if it fails the accuracy gate.")] = False,
    export_hf: Annotated[
        str | None, typer.Option(help="Also keep ModelOpt's unified HF checkpoint (hf_quant_config.json) here.")
    ] = None,
    embedding_quant: Annotated[
        str, typer.Option(help="auto | none | int8: per-row int8 embedding / LM head "
                               "(auto: int8 with --int8, --int4-awq, --w8a8).")
    ] = "auto",
    smoothquant_alpha: Annotated[
        float | None, typer.Option(help="--w8a8 SmoothQuant migration strength in [0, 1] (default 0.5).")
    ] = None,
    lora: Annotated[
        list[str] | None, typer.Option(help="PEFT LoRA adapter dir to merge before building (repeatable).")
    ] = None,
    prompt_table: Annotated[
        list[str] | None,
        typer.Option(help="NAME=ADAPTER: serve a PEFT prompt-tuning/p-tuning adapter as task NAME (repeatable)."),
    ] = None,
) -> None:
    """Build an engine and print where it is, with its parameter count, size and build time."""
    from engine.errors import BuildError

    chosen = [name for name, on in (("fp8", fp8), ("int8_wo", int8), ("int4_awq", int4_awq), ("w8a8_sq", w8a8)) if on]
    if len(chosen) > 1:
        raise BuildError("--fp8, --int8, --int4-awq and --w8a8 are mutually exclusive; choose one")
    tables = []
    for entry in prompt_table or []:
        name, sep, adapter = entry.partition("=")
        if not sep or not name or not adapter:
            raise BuildError(f"--prompt-table {entry!r}: expected NAME=ADAPTER_DIR")
        tables.append((name, adapter))
    options = _options(
        lora=tuple(lora or ()),
        prompt_tables=tuple(tables),
        quantization=chosen[0] if chosen else "none",
        kv_cache_dtype=kv_cache_dtype,
        group_size=group_size,
        calib_data=calib_data,
        calib_size=calib_size,
        accuracy_budget=accuracy_budget,
        force=force,
        export_hf=export_hf,
        embedding_quant=embedding_quant,
        smoothquant_alpha=smoothquant_alpha,
        dtype=dtype,
        max_batch_size=max_batch_size,
        max_seq_len=max_seq_len,
        max_num_tokens=max_num_tokens,
        kv_block_size=kv_block_size,
        tp_size=tp,
    )
    from engine.build.builder import build_engine

    engine_dir = build_engine(checkpoint, output, options, progress=not quiet)
    report = json.loads((engine_dir / "build_report.json").read_text())
    num_bytes = sum(report["bytes_per_rank"].values())
    console.print(f"[bold green]engine:[/] {engine_dir}", highlight=False)
    console.print(
        f"  {report['architecture']}, {report['num_parameters'] / 1e6:.1f}M parameters, {report['dtype']}, "
        f"{num_bytes / 2**20:.1f} MiB, built in {report['build_seconds']:.1f} s",
        highlight=False,
    )
    if "accuracy" in report:
        from engine.build.quantize import GateResult

        console.print(f"  {GateResult(**report['accuracy']).describe()}", highlight=False)


def main() -> None:
    run_cli(app, sys.argv[1:])


if __name__ == "__main__":
    main()
