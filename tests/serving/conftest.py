"""Fixtures for serving tests: a tiny engine built once per session, and Triton servers that
are always stopped (and their processes gone) when the module that started them ends."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from serving.triton.launcher import TritonServer
from serving.triton.repository import RepoOptions, write_model_repository

# Small limits keep the KV pool tiny and make "prompt longer than max_seq_len" cheap to send.
TINY_ENGINE_MAX_SEQ_LEN = 512
TINY_ENGINE_MAX_BATCH_SIZE = 48


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float32 Kiln engine built from the tiny llama-gqa checkpoint."""
    from engine.build.builder import BuildOptions, build_engine

    out = tmp_path_factory.mktemp("engines") / "tiny-llama"
    options = BuildOptions(dtype="float32", max_batch_size=TINY_ENGINE_MAX_BATCH_SIZE,
                           max_seq_len=TINY_ENGINE_MAX_SEQ_LEN)
    return build_engine(tiny_checkpoint("llama-gqa"), out, options, progress=False)


@pytest.fixture(scope="module")
def triton_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., TritonServer]]:
    """`triton_factory(engine_dir, **repo_options)` -> a ready TritonServer; all stopped at module end."""
    servers: list[TritonServer] = []

    def start(engine_dir: Path, **repo_options: object) -> TritonServer:
        repo = tmp_path_factory.mktemp("repo")
        write_model_repository(engine_dir, repo, RepoOptions(**repo_options))  # type: ignore[arg-type]
        server = TritonServer(repo)
        servers.append(server)
        server.start()
        server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()


@dataclass
class Generation:
    """What a streaming client received for one request."""

    chunks: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    num_input_tokens: int | None = None
    num_output_tokens: int | None = None
    error: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.chunks)


def _bytes_input(grpcclient: Any, name: str, values: list[bytes]) -> Any:
    tensor = grpcclient.InferInput(name, [1, len(values)], "BYTES")
    tensor.set_data_from_numpy(np.array([values], dtype=np.object_))
    return tensor


def grpc_inputs(prompt: str | bytes, max_tokens: int | None = None, stream: bool = True, **extra: Any) -> list[Any]:
    """TensorRT-LLM-style request tensors for tritonclient.grpc (or .aio): shapes [1, 1]."""
    import tritonclient.grpc as grpcclient

    raw = prompt.encode() if isinstance(prompt, str) else prompt
    inputs = [_bytes_input(grpcclient, "text_input", [raw])]
    dtypes = {bool: ("BOOL", np.bool_), int: ("INT32", np.int32), float: ("FP32", np.float32)}
    values: dict[str, Any] = {"stream": stream, **extra}
    if max_tokens is not None:
        values["max_tokens"] = max_tokens
    for name, value in values.items():
        if isinstance(value, list):
            inputs.append(_bytes_input(grpcclient, name, [v.encode() for v in value]))
            continue
        triton_type, np_type = dtypes[type(value)]
        if name in ("seed", "random_seed"):
            triton_type, np_type = "UINT64", np.uint64
        tensor = grpcclient.InferInput(name, [1, 1], triton_type)
        tensor.set_data_from_numpy(np.array([[value]], dtype=np_type))
        inputs.append(tensor)
    return inputs


def _first(result: Any, name: str) -> Any:
    array = result.as_numpy(name)
    return None if array is None else array.reshape(-1)[0]


async def grpc_stream_generate(url: str, inputs: list[Any], model: str = "ensemble",
                               cancel_after_chunks: int | None = None) -> Generation:
    """One gRPC bidirectional stream carrying one request; collects responses until the one
    with a finish_reason, an error, or (when asked) cancels after that many text chunks."""
    import tritonclient.grpc.aio as grpcaio

    client = grpcaio.InferenceServerClient(url)
    gen = Generation()

    async def requests() -> AsyncIterator[dict[str, Any]]:
        yield {"model_name": model, "inputs": inputs}

    stream = client.stream_infer(requests())
    try:
        async for result, error in stream:
            if error is not None:
                gen.error = error.message()
                break
            text = _first(result, "text_output")
            gen.chunks.append(text.decode() if text is not None else "")
            reason = _first(result, "finish_reason")
            if reason is not None:
                gen.finish_reason = reason.decode()
                gen.num_input_tokens = int(_first(result, "num_input_tokens"))
                gen.num_output_tokens = int(_first(result, "num_output_tokens"))
                break
            if cancel_after_chunks is not None and len(gen.chunks) >= cancel_after_chunks:
                break
    finally:
        stream.cancel()
        await client.close()
    return gen


def scrape(metrics_url: str, name: str, **labels: str) -> float:
    """Sum of the samples of metric `name` (with those labels) on a Prometheus text page."""
    import httpx

    total, found = 0.0, False
    for line in httpx.get(metrics_url, timeout=10).text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    if not found:
        raise AssertionError(f"metric {name}{labels or ''} not found at {metrics_url}")
    return total


@pytest.fixture(scope="session")
def triton_client() -> SimpleNamespace:
    """Client helpers for Triton tests: `inputs(...)`, `stream_generate(...)` (async), `scrape(...)`."""
    return SimpleNamespace(inputs=grpc_inputs, stream_generate=grpc_stream_generate, scrape=scrape,
                           Generation=Generation)
