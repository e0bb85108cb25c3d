"""A TP=2 engine served by a real tritonserver: one Triton model instance drives both ranks."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx

from engine import LLM, SamplingParams
from serving.triton.launcher import TritonServer
from serving.triton.repository import RepoOptions, write_model_repository

PROMPT = "the quick brown fox jumps over"


def test_tp2_engine_served_by_triton_answers_like_tp1(tp_engine: Callable[..., Path], tmp_path: Path,
                                                     child_pids: Callable[[int], list[int]],
                                                     group_pids: Callable[[int], list[int]]) -> None:
    llm = LLM(tp_engine("llama-gqa", 1))
    expected = llm.generate([PROMPT], SamplingParams(max_tokens=10, temperature=0))[0]
    write_model_repository(tp_engine("llama-gqa", 2), tmp_path / "repo", RepoOptions())
    server = TritonServer(tmp_path / "repo")
    try:
        server.start()
        server.wait_ready()
        assert server.process is not None
        pgid = server.process.pid
        stubs = [p for p in group_pids(pgid) if p != pgid]
        assert any(child_pids(stub) for stub in stubs)  # the model instance spawned its rank-1 worker
        response = httpx.post(f"{server.http_url}/v2/models/ensemble/generate", timeout=60,
                              json={"text_input": PROMPT, "max_tokens": 10, "exclude_input_in_output": True})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["text_output"] == expected.text and body["num_output_tokens"] == len(expected.token_ids)
    finally:
        server.stop()
    deadline = time.monotonic() + 5
    while group_pids(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not group_pids(pgid)  # server, python stub and TP worker all gone
