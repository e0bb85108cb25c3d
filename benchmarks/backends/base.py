"""The interface every load-generator backend implements, and the registry that names them."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from benchmarks.datasets import SampleRequest
from benchmarks.errors import BenchmarkError
from benchmarks.metrics import RequestRecord


@dataclass(frozen=True)
class BackendOptions:
    """How requests are sent: where, to which model, and with which generation options."""

    url: str
    model: str
    ignore_eos: bool = False
    temperature: float = 0.0
    request_timeout_s: float = 600.0
    api_key: str | None = None


class Backend(ABC):
    """Sends one streaming request at a time per call; many calls run concurrently.

    Contract of `send`: the caller has set `record.start_time` (seconds since `clock_origin`)
    just before calling. `send` streams the request and calls `record.on_output(text, now)`
    for every chunk that carries output, sets `server_output_tokens` when the server reports
    a count, and sets `success` or `error` before returning. It never raises for a failed
    request (that is a record with `success=False`); cancellation propagates, leaving the
    record as measured so far.
    """

    name: str = ""

    def __init__(self, options: BackendOptions) -> None:
        self.options = options
        self.clock_origin = time.perf_counter()
        # What serves the model behind the endpoint (kiln | vllm | hf for Kiln), set by `start`
        # where the server says: Triton's model config, the OpenAI gateway's /models.
        self.serving_backend: str | None = None

    def now(self) -> float:
        """Seconds since `clock_origin` (perf_counter based)."""
        return time.perf_counter() - self.clock_origin

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open connections and check the target (raise BenchmarkError if unusable)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    @abstractmethod
    async def send(self, request: SampleRequest, record: RequestRecord) -> None:
        """Stream `request`, filling `record` (see the class contract)."""


BACKENDS: dict[str, Callable[[BackendOptions], Backend]] = {}


def register_backend(name: str) -> Callable[[type[Backend]], type[Backend]]:
    def wrap(cls: type[Backend]) -> type[Backend]:
        cls.name = name
        BACKENDS[name] = cls
        return cls

    return wrap


def make_backend(name: str, options: BackendOptions) -> Backend:
    """The backend registered under `name`."""
    if name not in BACKENDS:
        raise BenchmarkError(f"--backend {name!r} is not one of {sorted(BACKENDS)}")
    return BACKENDS[name](options)


def error_text(exc: BaseException) -> str:
    """One line describing an exception, for a record's `error`."""
    message = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {message[0]}" if message else type(exc).__name__
