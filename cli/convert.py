"""`kiln convert MODEL.gguf -o CKPT_DIR`: a GGUF file -> the equivalent Hugging Face checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command("convert")
    def convert(
        gguf_file: Annotated[Path, typer.Argument(help="A llama-family .gguf file (any llama.cpp quantization).")],
        output: Annotated[Path, typer.Option("-o", "--output", help="New (or empty) checkpoint directory.")],
        dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16 for the dequantized weights.")] = (
            "float32"
        ),
        quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No progress bars.")] = False,
    ) -> None:
        """Dequantize a GGUF file into a Hugging Face checkpoint (safetensors, config, tokenizer, chat template)."""
        from rich.console import Console

        from engine.build.gguf import convert_gguf

        out = convert_gguf(gguf_file, output, dtype=dtype, progress=not quiet)
        Console().print(f"[bold green]checkpoint:[/] {out}", highlight=False)
