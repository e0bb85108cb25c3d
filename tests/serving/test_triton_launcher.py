"""TritonServer: the real tritonserver binary, its failures reported with the log, nothing left behind."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from serving.triton.launcher import TritonServer, TritonServerError, find_tritonserver, prepare_backend_dir
from serving.triton.repository import write_model_repository


def test_binary_and_backend_dir_come_from_the_wheel(tmp_path: Path) -> None:
    binary = find_tritonserver()
    backend = prepare_backend_dir(tmp_path, binary)
    names = sorted(p.name for p in (backend / "python").iterdir())
    assert names == ["libtriton_python.so", "triton_python_backend_stub", "triton_python_backend_utils.py"]
    assert all((backend / "python" / n).resolve().is_file() for n in names)


def test_incomplete_wheel_is_a_clear_error(tmp_path: Path) -> None:
    fake = tmp_path / "tritonserver" / "bin" / "tritonserver"
    fake.parent.mkdir(parents=True)
    fake.touch()
    with pytest.raises(TritonServerError, match="python backend file libtriton_python.so missing"):
        prepare_backend_dir(tmp_path / "backends", fake)


def test_port_in_use_names_the_flag(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = TritonServer(tmp_path, grpc_port=port)
        with pytest.raises(TritonServerError, match=f"--grpc-port {port}: 127.0.0.1:{port} is already in use"):
            server.start()
    assert server.process is None


def test_missing_repository_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TritonServerError, match="is not a directory"):
        TritonServer(tmp_path / "nope").start()


def test_model_that_fails_to_load_reports_the_log_and_leaves_nothing(
    tiny_engine: Path, tmp_path: Path, process_gone: Callable[[int], bool], group_pids: Callable[[int], list[int]]
) -> None:
    model_dir = write_model_repository(tiny_engine, tmp_path / "repo")
    config = model_dir / "config.pbtxt"
    config.write_text(config.read_text().replace(str(tiny_engine.resolve()), str(tmp_path / "no-such-engine")))
    server = TritonServer(tmp_path / "repo")
    server.start()
    pid = server.pid
    assert pid is not None
    with pytest.raises(TritonServerError, match="exited with code 1 before becoming ready") as excinfo:
        server.wait_ready(timeout=120)
    assert "no-such-engine" in str(excinfo.value)  # the model's own error, from the log excerpt
    assert process_gone(pid) and group_pids(pid) == []
    assert server.process is None and server.log_file is not None and not server.log_file.exists()
