"""`kiln generate ENGINE "prompt"`: run an engine (or a checkpoint, built on the fly) once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()


def register(app: typer.Typer) -> None:
    @app.command()
    def generate(
        engine: Annotated[Path, typer.Argument(help="Engine directory, HF checkpoint directory or .gguf file.")],
        prompt: Annotated[str, typer.Argument(help="The prompt text.")],
        max_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 64,
        temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
        top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
        top_k: Annotated[int, typer.Option(help="Top-k sampling (0 = off).")] = 0,
        seed: Annotated[int | None, typer.Option(help="Per-request sampling seed.")] = None,
        chat: Annotated[bool, typer.Option(help="Wrap the prompt in the model's chat template.")] = False,
        stream: Annotated[bool, typer.Option(help="Print tokens as they are generated.")] = False,
        device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N (default: CUDA if available).")] = None,
        dtype: Annotated[str | None, typer.Option(help="Run-time dtype (default: the engine's).")] = None,
    ) -> None:
        """Generate a completion and print it with timing."""
        from engine.generate import GenerateRequest, run_generate

        request = GenerateRequest(
            engine=engine, prompt=prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
            top_k=top_k, seed=seed, chat=chat, device=device, dtype=dtype,
        )
        on_delta = (lambda text: console.print(text, end="", highlight=False, markup=False)) if stream else None
        result = run_generate(request, on_delta=on_delta)
        if stream:
            console.print()
        else:
            console.print(result.text, highlight=False, markup=False)
        console.print(
            f"[dim]{result.num_prompt_tokens} prompt + {result.num_output_tokens} generated tokens, "
            f"finish_reason={result.finish_reason}, TTFT {result.ttft_s * 1000:.0f} ms, "
            f"{result.decode_tokens_per_s:.1f} tokens/s decode[/]"
        )
