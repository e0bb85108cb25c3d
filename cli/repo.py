"""`kiln repo`: write a Triton model repository that serves a Kiln engine."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("repo")
    def repo(
        engine: Path = typer.Argument(
            ..., help="Engine directory (made by build-engine) or Hugging Face checkpoint directory."),
        output: Path = typer.Option(..., "-o", "--output", help="Model repository directory to write into."),
        model_name: str = typer.Option("ensemble", "--model-name", help="Triton model name."),
        decoupled: bool = typer.Option(
            True, "--decoupled/--no-decoupled",
            help="Decoupled model (streaming, gRPC streams, /generate_stream); --no-decoupled allows HTTP infer."),
        max_queue_delay_us: int = typer.Option(
            0, "--max-queue-delay-us", help="Dynamic batcher delay before execute() (the engine batches anyway)."),
        instance_count: int = typer.Option(1, "--instance-count", help="Model instances (each loads the engine)."),
        force: bool = typer.Option(False, "--force", help="Replace the model if it already exists."),
        backend: str = typer.Option(
            "auto", "--backend",
            help="auto|kiln|vllm|hf: auto = kiln for engines and Kiln architectures, else vllm if installed, else hf."),
    ) -> None:
        """Write DIR/<model-name>/{config.pbtxt,1/model.py} serving ENGINE with TensorRT-LLM tensor names."""
        from rich.console import Console

        from serving.backends import choose_backend
        from serving.triton.repository import RepoOptions, write_model_repository

        options = RepoOptions(model_name=model_name, decoupled=decoupled,
                              max_queue_delay_us=max_queue_delay_us, instance_count=instance_count, backend=backend)
        choice = choose_backend(engine, backend)
        console = Console()
        console.print(f"backend: [bold]{choice.name}[/] ({choice.reason})", highlight=False)
        model_dir = write_model_repository(engine, output, options, force=force, choice=choice)
        console.print(f"wrote [bold]{model_dir}[/] (model {engine.resolve()})\n"
                        f"serve it with: kiln serve {output}", highlight=False)
