"""`GatewayServer`: the OpenAI gateway on uvicorn in a background thread.

    gateway = GatewayServer("127.0.0.1:8001", "ensemble", Path("my-engine"), port=9000)
    gateway.start()          # returns once the port accepts connections
    ...                      # http://127.0.0.1:9000/v1/...
    gateway.stop()

Used by `kiln serve` (next to tritonserver), by `kiln openai` (alone) and by tests. The socket
is bound here, before uvicorn starts, so a port in use is a clear error and port 0 picks a free
one (read `gateway.port` after `start()`).
"""

from __future__ import annotations

import errno
import json
import logging
import signal
import socket
import threading
import time
from pathlib import Path
from types import FrameType, TracebackType

from engine.errors import KilnError

DEFAULT_PORT = 9000
START_TIMEOUT_S = 30.0
# How long a stop() waits for open streams before uvicorn closes them.
GRACEFUL_SHUTDOWN_S = 5.0


class GatewayError(KilnError):
    """The gateway could not start (port in use, no tokenizer, unknown context length)."""


def resolve_max_seq_len(tokenizer_dir: Path, max_seq_len: int | None) -> int:
    """The context limit to enforce: given, else the engine's `build.max_seq_len` when
    `tokenizer_dir` is an engine directory, else the checkpoint's `max_position_embeddings`."""
    if max_seq_len is not None:
        if max_seq_len < 2:
            raise GatewayError(f"--max-seq-len must be >= 2, got {max_seq_len}")
        return max_seq_len
    from engine.config import is_engine_dir, load_engine_config

    if is_engine_dir(tokenizer_dir):
        return load_engine_config(tokenizer_dir).build.max_seq_len
    config = Path(tokenizer_dir) / "config.json"
    if config.is_file():
        try:
            value = json.loads(config.read_text()).get("max_position_embeddings")
        except (json.JSONDecodeError, UnicodeDecodeError):
            value = None
        if isinstance(value, int) and value > 1:
            return value
    raise GatewayError(
        f"{tokenizer_dir}: cannot tell the model's context length (not an engine directory, no "
        "max_position_embeddings in config.json); pass --max-seq-len"
    )


def engine_tasks(engine_dir: Path) -> tuple[str, ...]:
    """The prompt-tuned tasks of the engine at `engine_dir` (none for a non-engine tokenizer dir)."""
    from engine.config import is_engine_dir, load_engine_config

    if not is_engine_dir(engine_dir):
        return ()
    return tuple(sorted(load_engine_config(engine_dir).source.get("prompt_tasks", {})))


class GatewayServer:
    """The OpenAI-compatible gateway for one Triton model, served from a background thread."""

    def __init__(
        self,
        triton_grpc_url: str,
        model_name: str,
        tokenizer_dir: Path,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        api_key: str | None = None,
        max_seq_len: int | None = None,
        log_level: str = "warning",
    ) -> None:
        self.triton_grpc_url = triton_grpc_url
        self.model_name = model_name
        self.tokenizer_dir = Path(tokenizer_dir)
        self.host = host
        self.port = port
        self.api_key = api_key or None
        self.max_seq_len = max_seq_len
        self.log_level = log_level
        self._server: object | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def url(self) -> str:
        """Base URL of the gateway (the OpenAI SDK's base_url is `url + "/v1"`)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> GatewayServer:
        """Load the tokenizer, bind the port and serve; returns once connections are accepted."""
        if self._thread is not None:
            raise GatewayError("this GatewayServer is already started")
        import uvicorn

        from serving.openai.app import GatewayConfig, create_app
        from serving.openai.prompts import PromptProcessor

        prompts = PromptProcessor.from_dir(self.tokenizer_dir, resolve_max_seq_len(self.tokenizer_dir, self.max_seq_len))
        tasks = engine_tasks(self.tokenizer_dir)
        app = create_app(GatewayConfig(self.triton_grpc_url, self.model_name, self.api_key, tasks), prompts)
        sock = _bind(self.host, self.port)
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            app,
            log_level=self.log_level,
            access_log=False,
            timeout_graceful_shutdown=int(GRACEFUL_SHUTDOWN_S),
            lifespan="on",
        )
        server = uvicorn.Server(config)
        self._server, self._socket = server, sock
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="kiln-openai",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise GatewayError(
                    f"the OpenAI gateway did not start on {self.host}:{self.port} within "
                    f"{START_TIMEOUT_S:.0f} s (see the log above)"
                )
            time.sleep(0.01)
        logging.getLogger("kiln.openai").info("OpenAI gateway on %s", self.url)
        return self

    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop serving (open streams get GRACEFUL_SHUTDOWN_S to finish) and free the port.
        Idempotent."""
        server, thread = self._server, self._thread
        if server is not None:
            server.should_exit = True  # type: ignore[attr-defined]
        if thread is not None:
            thread.join(GRACEFUL_SHUTDOWN_S + 10)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None

    def serve_forever(self) -> None:
        """start(), then block until SIGINT/SIGTERM (main thread only), then stop()."""
        stop_requested = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            stop_requested.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            if self._thread is None:
                self.start()
            while not stop_requested.wait(0.5):
                if not self.is_running():
                    raise GatewayError("the OpenAI gateway stopped unexpectedly")
        finally:
            self.stop()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def __enter__(self) -> GatewayServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets that say they are TCP,
    # and without it every small SSE write waits ~40 ms for a delayed ACK (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise GatewayError(f"--port {port}: {host}:{port} is already in use") from None
        raise GatewayError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock
