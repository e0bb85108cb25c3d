"""`kiln serve ENGINE` end to end: the real CLI process starts Triton and the OpenAI gateway,
prints working endpoints, and on SIGINT ends in-flight requests with an error, exits cleanly
and leaves no process or temporary repository behind. One server for the module."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from serving.triton.launcher import pick_free_port
from serving.triton.repository import RepositoryError
from serving.triton.serve import ServeOptions, resolve_repository

KILN = [sys.executable, "-m", "cli.main"]
READY_TIMEOUT_S = 240


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except OSError:
                continue
    return found


class ServeProcess:
    """A `kiln serve` child process whose stdout is collected by a reader thread."""

    def __init__(self, args: list[str]) -> None:
        self.process = subprocess.Popen([*KILN, "serve", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, cwd=Path(__file__).parents[2], env={**os.environ, "COLUMNS": "200"})
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if match := re.search(pattern, line):
                    return match
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"no line matching {pattern!r}; kiln serve said:\n{self.output}")

    def kill(self) -> None:
        if self.process.poll() is None:
            for child in _children(self.process.pid):  # the tritonserver we would otherwise orphan
                os.killpg(child, signal.SIGKILL)
            self.process.kill()
        self.process.wait()
        self._reader.join(timeout=5)


@pytest.fixture(scope="module")
def served(tiny_engine: Path) -> Iterator[tuple[ServeProcess, dict[str, int]]]:
    ports = {name: pick_free_port() for name in ("http", "grpc", "metrics", "openai")}
    serve = ServeProcess([str(tiny_engine), "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"]),
                          "--metrics-port", str(ports["metrics"]), "--openai-port", str(ports["openai"])])
    try:
        serve.wait_for_line(r"Ctrl-C to stop", READY_TIMEOUT_S)
        yield serve, ports
    finally:
        serve.kill()


def test_printed_curl_line_works(served: tuple[ServeProcess, dict[str, int]]) -> None:
    serve, ports = served
    curl = serve.wait_for_line(r"^\s*(curl -X POST .*)$", 5).group(1)
    assert f"127.0.0.1:{ports['http']}/v2/models/ensemble/generate" in curl
    result = subprocess.run(shlex.split(curl), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and '"text_output":"What is ML?' in result.stdout
    assert f"OpenAI   http://127.0.0.1:{ports['openai']}/v1" in serve.output


def test_openai_gateway_answers_through_triton(served: tuple[ServeProcess, dict[str, int]]) -> None:
    from openai import OpenAI

    _, ports = served
    client = OpenAI(base_url=f"http://127.0.0.1:{ports['openai']}/v1", api_key="unused")
    completion = client.completions.create(model="ensemble", prompt="What is ML?", max_tokens=8, temperature=0)
    triton = httpx.post(f"http://127.0.0.1:{ports['http']}/v2/models/ensemble/generate", timeout=60,
                        json={"text_input": "What is ML?", "max_tokens": 8, "exclude_input_in_output": True})
    assert completion.choices[0].text == triton.json()["text_output"]


def test_sigint_with_requests_in_flight_ends_them_with_an_error_and_leaves_nothing(
    served: tuple[ServeProcess, dict[str, int]], triton_client: SimpleNamespace,
    process_gone: Callable[[int], bool], group_pids: Callable[[int], list[int]],
) -> None:
    serve, ports = served
    grpc_url = f"127.0.0.1:{ports['grpc']}"
    metrics_url = f"http://127.0.0.1:{ports['metrics']}/metrics"
    tritons = _children(serve.process.pid)
    assert len(tritons) == 1
    repo_dir = Path(serve.wait_for_line(r"repo\s+(\S+) \(temporary", 1).group(1))
    assert repo_dir.is_dir()
    results: list[object] = []

    async def in_flight() -> list[object]:
        return await asyncio.gather(*(triton_client.stream_generate(
            grpc_url, triton_client.inputs("hello", 500, ignore_eos=True)) for _ in range(6)))

    runner = threading.Thread(target=lambda: results.extend(asyncio.run(in_flight())))
    runner.start()
    deadline = time.monotonic() + 60
    while triton_client.scrape(metrics_url, "kiln_num_requests_running") < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    serve.process.send_signal(signal.SIGINT)
    code = serve.process.wait(timeout=60)
    runner.join(timeout=60)

    assert code == 0, serve.output
    assert len(results) == 6
    assert all(g.error is not None and "shutting down" in g.error and g.finish_reason is None  # type: ignore[attr-defined]
               for g in results), results
    assert process_gone(tritons[0]) and group_pids(tritons[0]) == []
    assert not repo_dir.exists()


def test_unknown_path_and_unknown_model_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="no such directory"):
        resolve_repository(tmp_path / "nope", ServeOptions())
    with pytest.raises(RepositoryError, match="model 'ensemble' not found in this repository"):
        resolve_repository(tmp_path, ServeOptions())
