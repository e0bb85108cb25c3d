"""`kiln openai`: run the OpenAI-compatible gateway alone, in front of a running Triton server."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("openai")
    def openai_gateway(
        triton_grpc: str = typer.Option(
            "127.0.0.1:8001", "--triton-grpc", help="Triton's gRPC endpoint, HOST:PORT."
        ),
        model_name: str = typer.Option(
            "ensemble", "--model-name", help="Triton model to call; also the OpenAI model id served."
        ),
        tokenizer: Path = typer.Option(
            ..., "--tokenizer", help="Directory with the engine's tokenizer files (the engine directory)."
        ),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
        port: int = typer.Option(9000, "--port", help="Port to listen on (0: any free port)."),
        api_key: str | None = typer.Option(
            None, "--api-key", envvar="KILN_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1/*."
        ),
        max_seq_len: int | None = typer.Option(
            None, "--max-seq-len", help="Context limit to enforce (default: the engine's build.max_seq_len)."
        ),
    ) -> None:
        """Serve /v1/completions, /v1/chat/completions and /v1/models over a Triton model."""
        from rich.console import Console

        from engine.errors import KilnError
        from serving.openai.runner import GatewayServer

        if not tokenizer.is_dir():
            raise KilnError(f"--tokenizer {tokenizer}: not a directory")
        if ":" not in triton_grpc:
            raise KilnError(f"--triton-grpc {triton_grpc!r}: expected HOST:PORT, e.g. 127.0.0.1:8001")
        gateway = GatewayServer(triton_grpc, model_name, tokenizer, host=host, port=port,
                                api_key=api_key, max_seq_len=max_seq_len)
        gateway.start()
        console = Console()
        console.print(f"OpenAI gateway: [bold]{gateway.url}/v1[/] -> Triton gRPC {triton_grpc} model {model_name!r}"
                      + (" (API key required)" if api_key else ""))
        console.print(
            f"  curl {gateway.url}/v1/completions -H 'Content-Type: application/json' "
            f"""-d '{{"model": "{model_name}", "prompt": "Hello", "max_tokens": 16}}'""",
            highlight=False, soft_wrap=True,
        )
        console.print("Ctrl-C to stop.")
        gateway.serve_forever()
