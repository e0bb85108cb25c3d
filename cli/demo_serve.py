"""The serving part of `make demo`: an engine behind a real Triton server, asked twice.

`run_serve_demo(engine_dir)` writes a model repository (temporary), starts tritonserver on
free loopback ports, sends one gRPC streaming request and one HTTP generate request, prints
the answers with the TTFT and tokens/s each client saw, and stops the server.
"""

from __future__ import annotations

import queue
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

DEMO_PROMPTS = ("Machine learning is", "The ocean covers")
DEMO_MAX_TOKENS = 32


@dataclass(frozen=True)
class DemoAnswer:
    transport: str
    prompt: str
    text: str
    ttft_s: float
    total_s: float
    num_tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.total_s if self.total_s > 0 else 0.0


def _grpc_stream(url: str, model: str, prompt: str, max_tokens: int) -> DemoAnswer:
    """One request on a gRPC bidirectional stream; TTFT = first text chunk."""
    import tritonclient.grpc as grpcclient

    responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    inputs = []
    for name, value, dtype, triton_type in (
        ("text_input", prompt.encode(), np.object_, "BYTES"),
        ("max_tokens", max_tokens, np.int32, "INT32"),
        ("stream", True, np.bool_, "BOOL"),
    ):
        tensor = grpcclient.InferInput(name, [1, 1], triton_type)
        tensor.set_data_from_numpy(np.array([[value]], dtype=dtype))
        inputs.append(tensor)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        start = time.perf_counter()
        client.async_stream_infer(model, inputs)
        chunks: list[str] = []
        first = None
        while True:
            result, error = responses.get(timeout=120)
            if error is not None:
                raise RuntimeError(f"gRPC request failed: {error}")
            first = first if first is not None else time.perf_counter()
            chunks.append(result.as_numpy("text_output").reshape(-1)[0].decode())
            if result.as_numpy("finish_reason") is not None:
                num_tokens = int(result.as_numpy("num_output_tokens").reshape(-1)[0])
                break
        end = time.perf_counter()
    finally:
        client.stop_stream()
        client.close()
    return DemoAnswer("gRPC stream", prompt, "".join(chunks), first - start, end - start, num_tokens)


def _http_generate(url: str, model: str, prompt: str, max_tokens: int) -> DemoAnswer:
    """One HTTP generate request; the whole answer comes at once, so TTFT = latency."""
    import httpx

    start = time.perf_counter()
    response = httpx.post(f"{url}/v2/models/{model}/generate", timeout=120,
                          json={"text_input": prompt, "max_tokens": max_tokens, "exclude_input_in_output": True})
    end = time.perf_counter()
    body = response.json()
    if response.status_code != 200:
        raise RuntimeError(f"HTTP generate failed ({response.status_code}): {body}")
    return DemoAnswer("HTTP generate", prompt, body["text_output"], end - start, end - start,
                      int(body["num_output_tokens"]))


def run_serve_demo(engine_dir: str | Path, console: Console | None = None) -> list[DemoAnswer]:
    """Serve `engine_dir` from Triton, ask it twice, print and return the answers."""
    from serving.triton.launcher import TritonServer
    from serving.triton.repository import write_model_repository

    console = console or Console()
    with tempfile.TemporaryDirectory(prefix="kiln-demo-repo-") as tmp:
        model_dir = write_model_repository(engine_dir, tmp)
        model = model_dir.name
        server = TritonServer(Path(tmp))
        with console.status("starting tritonserver and loading the engine..."):
            server.start()
            try:
                server.wait_ready()
            except BaseException:
                server.stop()
                raise
        try:
            console.print(f"Triton ready: HTTP {server.http_url}  gRPC {server.grpc_url}  "
                          f"metrics {server.metrics_url}", highlight=False)
            answers = [
                _grpc_stream(server.grpc_url, model, DEMO_PROMPTS[0], DEMO_MAX_TOKENS),
                _http_generate(server.http_url, model, DEMO_PROMPTS[1], DEMO_MAX_TOKENS),
            ]
        finally:
            server.stop()
    table = Table(title="Kiln on Triton")
    for column in ("transport", "prompt", "answer", "TTFT (ms)", "tokens", "tokens/s"):
        table.add_column(column, overflow="fold")
    for a in answers:
        table.add_row(a.transport, a.prompt, a.text, f"{a.ttft_s * 1000:.1f}", str(a.num_tokens),
                      f"{a.tokens_per_s:.1f}")
    console.print(table)
    return answers
