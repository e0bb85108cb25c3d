"""Run the real `tritonserver` binary (from the nvidia-pytriton wheel) as a managed child process.

`TritonServer` is a context manager used by `kiln serve`, by tests and by benchmarks:

    with TritonServer(repo_dir) as server:       # start() + wait_ready()
        client = tritonclient.grpc.InferenceServerClient(server.grpc_url)
    # stop(): SIGTERM to the server's process group, SIGKILL after the grace period

The server runs in its own session (process group) so that a terminal's Ctrl-C reaches only
the parent, which decides how to stop it; stopping signals the whole group, so the python
backend stubs (which learn about shutdown through that signal, see `serving/triton/model.py`)
and the server both exit, and nothing is left behind.
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path
from types import TracebackType

from engine.errors import KilnError

# Triton's own grace period on SIGTERM: the model aborts in-flight requests at once when the
# stop signal arrives (ending them with an error), so unloading takes about a second; this
# bound only matters if a model hangs.
DEFAULT_EXIT_TIMEOUT_SECS = 10
DEFAULT_READY_TIMEOUT_S = 180.0
LOG_EXCERPT_LINES = 40


class TritonServerError(KilnError):
    """tritonserver could not be found, started, or did not become ready."""


def find_tritonserver() -> Path:
    """Path of the `tritonserver` binary shipped in the installed nvidia-pytriton wheel."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonServerError(
            "tritonserver not found: the nvidia-pytriton package is not installed "
            "(pip install 'kiln-llm[serve]')"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    binary = root / "bin" / "tritonserver"
    if not binary.is_file() or not os.access(binary, os.X_OK):
        raise TritonServerError(f"tritonserver not found at {binary} (reinstall nvidia-pytriton)")
    return binary


def prepare_backend_dir(target: Path, tritonserver: Path | None = None) -> Path:
    """Make `<target>/python/` with links to the python backend and the stub for this Python.

    The wheel keeps the backend library in `backends/python/` but the per-version stubs in
    `python_backend_stubs/<X.Y>/`; Triton expects all three files side by side.
    """
    root = (tritonserver or find_tritonserver()).parent.parent
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    sources = {
        "libtriton_python.so": root / "backends" / "python" / "libtriton_python.so",
        "triton_python_backend_utils.py": root / "backends" / "python" / "triton_python_backend_utils.py",
        "triton_python_backend_stub": root / "python_backend_stubs" / version / "triton_python_backend_stub",
    }
    for name, source in sources.items():
        if not source.is_file():
            raise TritonServerError(f"python backend file {name} missing from the wheel: {source}")
    python_dir = target / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for name, source in sources.items():
        link = python_dir / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(source)
    return target


# Listening ports come from below the kernel's ephemeral range (32768-60999 by default): a port
# the OS handed out with bind(0) and that was then released can be taken at once as the local
# port of an outgoing connection, and tritonserver would then fail to bind it after reporting
# ready on another port.
_PORT_RANGE = (20000, 32000)
_handed_out: set[int] = set()


def pick_free_port(host: str = "127.0.0.1") -> int:
    """A port, outside the ephemeral range, that was free a moment ago and that this process
    has not handed out before."""
    for _ in range(200):
        port = random.randint(*_PORT_RANGE)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise TritonServerError(f"no free port found in {_PORT_RANGE[0]}-{_PORT_RANGE[1]} on {host}")


def check_port_free(host: str, port: int, flag: str) -> None:
    """Raise TritonServerError naming `flag` when `host:port` cannot be bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise TritonServerError(f"{flag} {port}: {host}:{port} is already in use ({exc.strerror})") from None


def server_environment() -> dict[str, str]:
    """Environment for tritonserver: this interpreter's bin first on PATH (the python stub finds
    its interpreter and site-packages through `python3` on PATH) and libpython's dir on
    LD_LIBRARY_PATH."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        env["LD_LIBRARY_PATH"] = str(libdir) + (
            os.pathsep + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else ""
        )
    # One thread pool per stub would oversubscribe small machines; the engine sets its own.
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def log_excerpt(log_file: Path, lines: int = LOG_EXCERPT_LINES) -> str:
    """What went wrong, from a server log: its error lines (`E...` records and model status
    rows that are not READY) when there are any, else its last `lines` lines."""
    try:
        text = log_file.read_text(errors="replace")
    except OSError:
        return "(no server log)"
    all_lines = text.strip().splitlines()
    errors = [
        line.strip() for line in all_lines
        if (_ERROR_RECORD.match(line) and "CudaDriverHelper" not in line)  # the latter: no GPU, harmless
        or ("UNAVAILABLE" in line and line.startswith("|"))
        or line.startswith(("error:", "Traceback", "Exception"))
    ]
    tail = errors[-lines:] if errors else all_lines[-lines:]
    return "\n".join(tail) if tail else "(server log is empty)"


_ERROR_RECORD = re.compile(r"^E\d{4} ")


def _reap_group(process: subprocess.Popen[bytes], grace: float, leftovers: tuple[Path | None, ...] = ()) -> int:
    """SIGTERM a server's process group, wait `grace` s, SIGKILL what is left, remove the
    `leftovers` paths; returns the server's exit code."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    # Stubs may outlive a killed server by a moment; the group id is the server's pid.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    code = process.wait()
    # Wait until the whole group is gone, so that no stub still writes into files the
    # caller is about to remove (orphaned stubs are reaped by init).
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.02)
    for path in leftovers:
        if path is not None and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path is not None:
            path.unlink(missing_ok=True)
    return code


class TritonServer:
    """A tritonserver process serving `model_repository` on loopback (by default) ports.

    Ports left as None are picked free at `start()`. After `start()`, `http_url`
    (`http://host:port`), `grpc_url` (`host:port`, as tritonclient.grpc wants it) and
    `metrics_url` (`http://host:port/metrics`) are set. `stop()` is idempotent and always
    leaves no process of the server's group behind.
    """

    def __init__(
        self,
        model_repository: Path,
        host: str = "127.0.0.1",
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        log_file: Path | None = None,
        exit_timeout_secs: int = DEFAULT_EXIT_TIMEOUT_SECS,
        log_verbose: int = 0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.model_repository = Path(model_repository)
        self.host = host
        self.http_port = http_port
        self.grpc_port = grpc_port
        self.metrics_port = metrics_port
        self.exit_timeout_secs = exit_timeout_secs
        self.log_verbose = log_verbose
        self.extra_args = tuple(extra_args)
        self._own_log = log_file is None
        self.log_file: Path | None = Path(log_file) if log_file is not None else None
        self.process: subprocess.Popen[bytes] | None = None
        self._backend_dir: Path | None = None
        self._log_handle: object | None = None
        self._reaper: weakref.finalize | None = None

    # -- urls ---------------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        return f"http://{self._url_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._url_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._url_host}:{self.metrics_port}/metrics"

    @property
    def _url_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> TritonServer:
        """Launch tritonserver (returns at once; call `wait_ready()` to wait for the models)."""
        if self.process is not None:
            raise TritonServerError("this TritonServer is already started")
        if not self.model_repository.is_dir():
            raise TritonServerError(f"model repository {self.model_repository} is not a directory")
        binary = find_tritonserver()
        for flag, port in (("--http-port", self.http_port), ("--grpc-port", self.grpc_port),
                           ("--metrics-port", self.metrics_port)):
            if port is not None:
                check_port_free(self.host, port, flag)
        self.http_port = self.http_port or pick_free_port(self.host)
        self.grpc_port = self.grpc_port or pick_free_port(self.host)
        self.metrics_port = self.metrics_port or pick_free_port(self.host)
        self._backend_dir = prepare_backend_dir(Path(tempfile.mkdtemp(prefix="kiln-triton-backends-")), binary)
        if self.log_file is None:
            fd, name = tempfile.mkstemp(prefix="kiln-triton-", suffix=".log")
            os.close(fd)
            self.log_file = Path(name)
        cmd = [
            str(binary),
            f"--model-repository={self.model_repository.resolve()}",
            f"--backend-directory={self._backend_dir}",
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true", "--allow-gpu-metrics=false", "--allow-cpu-metrics=false",
            "--pinned-memory-pool-byte-size=0", "--cuda-memory-pool-byte-size=0:0",
            f"--exit-timeout-secs={self.exit_timeout_secs}",
            f"--log-verbose={self.log_verbose}",
            *self.extra_args,
        ]
        log_handle = open(self.log_file, "ab")  # noqa: SIM115 - closed in stop()
        self._log_handle = log_handle
        try:
            self.process = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log_handle, stderr=subprocess.STDOUT,
                env=server_environment(), start_new_session=True,
            )
        except OSError as exc:
            self._cleanup_files()
            raise TritonServerError(f"could not execute {binary}: {exc}") from None
        # If the owner never calls stop() (crash, forgotten), the server still goes at exit.
        self._reaper = weakref.finalize(
            self, _reap_group, self.process, float(self.exit_timeout_secs + 10),
            (self._backend_dir, self.log_file if self._own_log else None),
        )
        return self

    def wait_ready(self, timeout: float = DEFAULT_READY_TIMEOUT_S) -> None:
        """Block until `/v2/health/ready` answers 200 (all models loaded).

        Raises TritonServerError with the log's last lines if the server exits first (port in
        use, model that fails to load) or is not ready within `timeout` seconds; the server
        is stopped in both cases.
        """
        if self.process is None:
            raise TritonServerError("wait_ready() called before start()")
        deadline = time.monotonic() + timeout
        url = f"{self.http_url}/v2/health/ready"
        while True:
            code = self.process.poll()
            if code is not None:
                excerpt = self._excerpt()
                self.stop()
                raise TritonServerError(
                    f"tritonserver exited with code {code} before becoming ready; "
                    f"last lines of its log ({self.log_file}):\n{excerpt}"
                )
            try:
                with urllib.request.urlopen(url, timeout=1.0) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                excerpt = self._excerpt()
                self.stop()
                raise TritonServerError(
                    f"tritonserver was not ready after {timeout:.0f} s; last lines of its log "
                    f"({self.log_file}):\n{excerpt}"
                )
            time.sleep(0.2)

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def send_signal(self, signum: int) -> None:
        """Signal the server's whole process group (server and python backend stubs)."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM the server's group, wait up to `timeout` (default: exit timeout + 10 s),
        then SIGKILL whatever is left of the group. Returns the server's exit code."""
        process = self.process
        code = None
        if process is not None and self._reaper is not None:
            self._reaper.detach()
            code = _reap_group(process, float(self.exit_timeout_secs + 10) if timeout is None else timeout)
        self.process = None
        self._reaper = None
        self._cleanup_files()
        return code

    def _excerpt(self) -> str:
        return log_excerpt(self.log_file) if self.log_file is not None else "(no server log)"

    def _cleanup_files(self) -> None:
        if self._log_handle is not None:
            self._log_handle.close()  # type: ignore[attr-defined]
            self._log_handle = None
        if self._backend_dir is not None:
            shutil.rmtree(self._backend_dir, ignore_errors=True)
            self._backend_dir = None
        if self._own_log and self.log_file is not None:
            self.log_file.unlink(missing_ok=True)

    def __enter__(self) -> TritonServer:
        self.start()
        self.wait_ready()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
