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
) -> None:
    """Build an engine and print where it is, with its parameter count, size and build time."""
    from engine.build.builder import build_engine

    options = _options(
        dtype=dtype,
        max_batch_size=max_batch_size,
        max_seq_len=max_seq_len,
        max_num_tokens=max_num_tokens,
        kv_block_size=kv_block_size,
        tp_size=tp,
    )
    engine_dir = build_engine(checkpoint, output, options, progress=not quiet)
    report = json.loads((engine_dir / "build_report.json").read_text())
    num_bytes = sum(report["bytes_per_rank"].values())
    console.print(f"[bold green]engine:[/] {engine_dir}", highlight=False)
    console.print(
        f"  {report['architecture']}, {report['num_parameters'] / 1e6:.1f}M parameters, {report['dtype']}, "
        f"{num_bytes / 2**20:.1f} MiB, built in {report['build_seconds']:.1f} s",
        highlight=False,
    )


def main() -> None:
    run_cli(app, sys.argv[1:])


if __name__ == "__main__":
    main()
