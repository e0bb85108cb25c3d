"""`kiln serve` as a library: Triton (and the OpenAI gateway) for a model repository or an engine.

    with KilnServer(Path("engines/tiny"), ServeOptions(http_port=8000)) as server:
        print(server.endpoints().curl)
        server.wait()             # until SIGINT/SIGTERM (see `install_stop_signals`) or Triton dies

An engine directory gets a model repository in a temporary directory, removed on stop.
Stopping order: gateway first (no new requests), then Triton (its model aborts what is still
in flight with an error), then the temporary files.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from engine.config import is_engine_dir, load_engine_config
from serving.backends import BackendChoice, choose_backend
from serving.triton.launcher import (
    DEFAULT_EXIT_TIMEOUT_SECS,
    DEFAULT_READY_TIMEOUT_S,
    TritonServer,
    TritonServerError,
    log_excerpt,
)
from serving.triton.repository import (
    RepoOptions,
    RepositoryError,
    find_models,
    read_engine_dir,
    write_model_repository,
)


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    http_port: int | None = 8000
    grpc_port: int | None = 8001
    metrics_port: int | None = 8002
    model_name: str = "ensemble"
    instance_count: int = 1
    exit_timeout_secs: int = DEFAULT_EXIT_TIMEOUT_SECS
    ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S
    openai: bool = True
    openai_port: int = 9000
    api_key: str | None = None
    log_file: Path | None = None
    backend: str = "auto"  # for an engine or checkpoint PATH: auto | kiln | vllm | hf


@dataclass(frozen=True)
class Endpoints:
    model_name: str
    repository: Path
    temporary_repository: bool
    http_url: str
    grpc_url: str
    metrics_url: str
    openai_url: str | None

    @property
    def curl(self) -> str:
        return (
            f"curl -X POST {self.http_url}/v2/models/{self.model_name}/generate "
            "-d '{\"text_input\": \"What is ML?\", \"max_tokens\": 20}'"
        )


def resolve_repository(
    path: Path, options: ServeOptions, choice: BackendChoice | None = None
) -> tuple[Path, Path | None]:
    """(model repository, temporary dir to remove or None) for a repository, an engine dir or a
    Hugging Face checkpoint (served by `choice`, default `choose_backend(path, options.backend)`)."""
    if is_engine_dir(path) or (path / "config.json").is_file():  # an engine or a checkpoint
        if is_engine_dir(path):
            load_engine_config(path)  # a clear error for a broken engine before starting anything
        tmp = Path(tempfile.mkdtemp(prefix="kiln-repo-"))
        try:
            write_model_repository(
                path, tmp, RepoOptions(model_name=options.model_name, instance_count=options.instance_count),
                choice=choice or choose_backend(path, options.backend),
            )
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return tmp, tmp
    if not path.is_dir():
        raise RepositoryError(f"{path}: no such directory (expected a model repository or an engine directory)")
    models = find_models(path)
    if options.model_name not in models:
        found = f"it has {models}" if models else "it has no model (no */config.pbtxt)"
        raise RepositoryError(
            f"{path}: model {options.model_name!r} not found in this repository ({found}); "
            "pass --model-name, or an engine directory"
        )
    return path, None


class KilnServer:
    """Triton plus, unless `options.openai` is False, the OpenAI gateway in this process."""

    def __init__(self, path: Path, options: ServeOptions | None = None, choice: BackendChoice | None = None) -> None:
        self.path = Path(path)
        self.options = options or ServeOptions()
        self.choice = choice
        self.triton: TritonServer | None = None
        self.gateway: Any | None = None
        self._tmp: Path | None = None
        self.repository: Path | None = None
        self._stop_requested = threading.Event()
        self.ready = False
        self.stopping = False

    def start(self) -> KilnServer:
        opts = self.options
        repository, self._tmp = resolve_repository(self.path, opts, self.choice)
        self.repository = repository
        try:
            self.triton = TritonServer(
                repository, host=opts.host, http_port=opts.http_port, grpc_port=opts.grpc_port,
                metrics_port=opts.metrics_port, log_file=opts.log_file, exit_timeout_secs=opts.exit_timeout_secs,
            )
            self.triton.start()
            self.triton.wait_ready(opts.ready_timeout_s)
            if opts.openai:
                from serving.openai.runner import GatewayServer, resolve_max_seq_len

                engine_dir = read_engine_dir(repository / opts.model_name)  # or a checkpoint (hf backend)
                self.gateway = GatewayServer(
                    self.triton.grpc_url, opts.model_name, engine_dir, host=opts.host, port=opts.openai_port,
                    api_key=opts.api_key, max_seq_len=resolve_max_seq_len(engine_dir, None),
                )
                self.gateway.start()
        except BaseException:
            self.stop()
            raise
        self.ready = True
        return self

    def endpoints(self) -> Endpoints:
        if self.triton is None or self.repository is None:
            raise TritonServerError("the server is not started")
        return Endpoints(
            model_name=self.options.model_name,
            repository=self.repository,
            temporary_repository=self._tmp is not None,
            http_url=self.triton.http_url,
            grpc_url=self.triton.grpc_url,
            metrics_url=self.triton.metrics_url,
            openai_url=self.gateway.url + "/v1" if self.gateway is not None else None,
        )

    def request_stop(self) -> None:
        """Make `wait()` return (safe from a signal handler)."""
        self._stop_requested.set()

    def wait(self) -> None:
        """Block until `request_stop()` or until Triton exits by itself (then raise with its log)."""
        while not self._stop_requested.wait(0.5):
            triton = self.triton
            if triton is None or not triton.is_running():
                code = triton.process.poll() if triton and triton.process else None
                excerpt = log_excerpt(triton.log_file) if triton and triton.log_file else ""
                raise TritonServerError(f"tritonserver exited unexpectedly (code {code}):\n{excerpt}")

    def stop(self) -> int | None:
        """Stop the gateway, then Triton; remove a temporary repository. Returns Triton's exit code."""
        self.stopping = True
        code = None
        if self.gateway is not None:
            self.gateway.stop()
            self.gateway = None
        if self.triton is not None:
            code = self.triton.stop()
            self.triton = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        self.ready = False
        self.stopping = False
        return code

    def __enter__(self) -> KilnServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def install_stop_signals(server: KilnServer) -> None:
    """Turn SIGINT/SIGTERM of this process into `server.request_stop()` once it is ready, and
    into KeyboardInterrupt while it is starting (call from the main thread)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        del frame
        if server.stopping:
            return  # a second Ctrl-C must not cut the cleanup short
        if not server.ready:
            # Still starting: unwind start(), which stops whatever it had started.
            raise KeyboardInterrupt
        server.request_stop()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)
