"""`kiln serve`: run a real Triton Inference Server (and the OpenAI gateway) for a repository or engine."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        path: Path = typer.Argument(
            ..., help="Model repository (kiln repo), engine directory or Hugging Face checkpoint directory."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address every endpoint binds."),
        http_port: int = typer.Option(8000, "--http-port"),
        grpc_port: int = typer.Option(8001, "--grpc-port"),
        metrics_port: int = typer.Option(8002, "--metrics-port"),
        model_name: str = typer.Option("ensemble", "--model-name", help="Model to serve / to create."),
        instance_count: int = typer.Option(1, "--instance-count", help="Instances when PATH is an engine."),
        exit_timeout_secs: int = typer.Option(
            10, "--exit-timeout-secs", help="Triton's shutdown bound; in-flight requests are aborted at once."),
        openai: bool = typer.Option(True, "--openai/--no-openai", help="Also serve the OpenAI-compatible API."),
        openai_port: int = typer.Option(9000, "--openai-port"),
        api_key: str | None = typer.Option(None, "--api-key", envvar="KILN_API_KEY",
                                           help="Bearer key the OpenAI API requires."),
        log_file: Path | None = typer.Option(None, "--log-file", help="Write Triton's log here (default: temp, removed)."),
        backend: str = typer.Option(
            "auto", "--backend",
            help="For an engine/checkpoint PATH: auto|kiln|vllm|hf (auto = kiln for engines and Kiln "
                 "architectures, else vllm if installed, else hf)."),
    ) -> None:
        """Start tritonserver, wait until the model is ready, print the endpoints; Ctrl-C stops everything."""
        from rich.console import Console

        from serving.backends import choose_backend
        from serving.triton.serve import KilnServer, ServeOptions, install_stop_signals

        console = Console()
        choice = None
        if (path / "config.json").is_file():  # an engine or checkpoint, not a repository
            choice = choose_backend(path, backend)
            console.print(f"backend: [bold]{choice.name}[/] ({choice.reason})", highlight=False)
        options = ServeOptions(
            host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
            model_name=model_name, instance_count=instance_count, exit_timeout_secs=exit_timeout_secs,
            openai=openai, openai_port=openai_port, api_key=api_key, log_file=log_file, backend=backend,
        )
        if choice is not None and choice.name == "vllm":  # vLLM compiles at start: 1-4 min on a small CPU
            options = dataclasses.replace(options, ready_timeout_s=max(options.ready_timeout_s, 900.0))
        server = KilnServer(path, options, choice)
        install_stop_signals(server)
        try:
            with console.status("starting tritonserver and loading the model..."):
                server.start()
        except KeyboardInterrupt:
            console.print("interrupted while starting; everything it had started is stopped", style="yellow")
            raise typer.Exit(130) from None
        try:
            ep = server.endpoints()
            console.print(f"[bold green]ready[/]: model [bold]{ep.model_name}[/]", highlight=False)
            console.print(f"  HTTP     {ep.http_url}   (generate: {ep.http_url}/v2/models/{ep.model_name}/generate)",
                          highlight=False)
            console.print(f"  gRPC     {ep.grpc_url}", highlight=False)
            note = " (temporary, removed on exit)" if ep.temporary_repository else ""
            console.print(f"  repo     {ep.repository}{note}", highlight=False)
            console.print(f"  metrics  {ep.metrics_url}", highlight=False)
            if ep.openai_url:
                console.print(f"  OpenAI   {ep.openai_url}", highlight=False)
            console.print(f"try:\n  {ep.curl}", highlight=False, soft_wrap=True)
            console.print("Ctrl-C to stop", style="dim")
            server.wait()
        finally:
            console.print("stopping...", style="dim")
            code = server.stop()
            console.print(f"stopped (tritonserver exit code {code})", style="dim", highlight=False)
