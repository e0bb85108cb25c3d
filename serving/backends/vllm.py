"""The `vllm` backend: vLLM's engine in its own environment, streamed into `RequestOutput`s.

vLLM pins packages Kiln's environment cannot share (numpy 2, transformers < 5.20), so it
lives in a separate venv (`make vllm` -> `.venv-vllm`; or the interpreter named by
`KILN_VLLM_PYTHON`). This backend starts vLLM's OpenAI server from that interpreter on a free
loopback port (`python -m vllm.entrypoints.openai.api_server`), and turns each request into a
streamed `/v1/completions` call with the prompt as token ids: every chunk becomes one
`RequestOutput` (delta text and token ids), the last one finished. Aborting a request closes
its stream, which vLLM turns into an abort of the sequence (its KV blocks are freed).

The server runs in this process's process group and dies with it (PR_SET_PDEATHSIG), so a
killed Triton stub leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from engine.errors import InvalidRequestError
from engine.outputs import RequestMetrics, RequestOutput
from engine.runtime.stats import EngineStats
from engine.sampling_params import SamplingParams
from serving.backends.base import BackendError, OutputCallback

logger = logging.getLogger("kiln.backends.vllm")

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = float(os.environ.get("KILN_VLLM_START_TIMEOUT_S", "600"))
SERVED_NAME = "kiln-vllm"


def vllm_python() -> Path | None:
    """The interpreter that has vLLM: $KILN_VLLM_PYTHON ("" disables vLLM), else `.venv-vllm`."""
    configured = os.environ.get("KILN_VLLM_PYTHON")
    if configured is not None:
        return Path(configured) if configured and Path(configured).is_file() else None
    default = REPO_ROOT / ".venv-vllm" / "bin" / "python"
    return default if default.is_file() else None


def vllm_architectures(python: Path) -> frozenset[str]:
    """The model architectures vLLM registers (asks the vLLM interpreter; ~10 s)."""
    code = "import json; from vllm import ModelRegistry; print(json.dumps(sorted(ModelRegistry.get_supported_archs())))"
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise BackendError(f"{python}: cannot import vllm ({tail}); rerun make vllm")
    return frozenset(json.loads(result.stdout.strip().splitlines()[-1]))


def _die_with_parent() -> None:
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class VllmBackend:
    """vLLM's OpenAI server (float32, CPU) behind the `Backend` interface."""

    name = "vllm"

    def __init__(self, path: str | Path, max_seq_len: int | None = None, kv_cache_gib: int = 1) -> None:
        from transformers import AutoConfig, AutoTokenizer

        python = vllm_python()
        if python is None:
            raise BackendError("vLLM is not installed: run `make vllm` (or set KILN_VLLM_PYTHON)")
        path = Path(path).resolve()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        config = AutoConfig.from_pretrained(str(path))
        self.max_seq_len = int(max_seq_len or min(getattr(config, "max_position_embeddings", 2048), 4096))
        self.vocab_size = int(config.vocab_size)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.NamedTemporaryFile(prefix="kiln-vllm-", suffix=".log", delete=False)  # noqa: SIM115
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), "OMP_NUM_THREADS": os.environ.get(
            "OMP_NUM_THREADS", str(os.cpu_count() or 1)),
            "VLLM_CACHE_ROOT": os.environ.get("VLLM_CACHE_ROOT", str(Path.home() / ".cache" / "kiln-vllm"))}
        env.pop("VIRTUAL_ENV", None)
        self.process = subprocess.Popen(
            [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(path),
             "--served-model-name", SERVED_NAME, "--dtype", "float32", "--host", "127.0.0.1",
             "--port", str(self.port), "--max-model-len", str(self.max_seq_len)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent,
        )
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._counters = {"prompt": 0, "generated": 0, "max_batch": 0}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kiln-vllm-loop", daemon=True)
        self._thread.start()
        self._stopped = False
        try:
            self._wait_healthy()
        except BaseException:
            self.shutdown()
            raise

    def _wait_healthy(self) -> None:
        import httpx

        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BackendError(f"vLLM exited while starting (code {self.process.returncode}):\n{self._log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise BackendError(f"vLLM did not become healthy in {START_TIMEOUT_S:.0f} s:\n{self._log_tail()}")

    def _log_tail(self, lines: int = 20) -> str:
        return "\n".join(Path(self._log.name).read_text(errors="replace").splitlines()[-lines:])

    # ---- thread-safe API -----------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    callback: OutputCallback, task: str | None = None) -> None:
        if task is not None:
            raise InvalidRequestError("prompt-tuned tasks (task_name) are served by the kiln backend only")
        if self._stopped:
            raise RuntimeError("the vllm backend is shut down")
        prompt_ids = list(self.tokenizer(prompt).input_ids) if isinstance(prompt, str) else list(prompt)
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty")
        if len(prompt_ids) > self.max_seq_len - 1:
            raise InvalidRequestError(
                f"the prompt has {len(prompt_ids)} tokens; this model takes at most {self.max_seq_len - 1}")
        metrics = RequestMetrics(arrival_time=time.monotonic())
        started = threading.Event()
        error: list[BaseException] = []

        def start() -> None:
            try:
                if request_id in self._tasks:
                    raise InvalidRequestError(f"request id {request_id!r} is already in use")
                self._tasks[request_id] = self._loop.create_task(
                    self._run(request_id, prompt, prompt_ids, params, callback, metrics))
                self._counters["max_batch"] = max(self._counters["max_batch"], len(self._tasks))
            except BaseException as exc:
                error.append(exc)
            finally:
                started.set()

        self._loop.call_soon_threadsafe(start)
        started.wait()
        if error:
            raise error[0]

    def abort(self, request_id: str) -> None:
        def cancel() -> None:
            task = self._tasks.get(request_id)
            if task is not None:
                task.cancel()

        self._loop.call_soon_threadsafe(cancel)

    def stats(self) -> EngineStats:
        c = self._counters
        return EngineStats(
            num_running=len(self._tasks), num_waiting=0, num_total_blocks=0, num_free_blocks=0, kv_cache_usage=0.0,
            prefix_cache_queries=0, prefix_cache_hits=0, num_preemptions=0, num_steps=0, last_batch_size=0,
            last_num_tokens=0, max_batch_size_seen=c["max_batch"], total_prompt_tokens=c["prompt"],
            total_generation_tokens=c["generated"],
        )

    def shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True

        async def cancel_all() -> None:
            tasks = list(self._tasks.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(cancel_all(), self._loop).result(timeout=30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)

    # ---- the asyncio thread ----------------------------------------------------------------------
    def _body(self, prompt_ids: list[int], p: SamplingParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": SERVED_NAME, "prompt": prompt_ids, "stream": True, "max_tokens": p.max_tokens,
            "temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k if p.top_k > 0 else -1, "min_p": p.min_p,
            "repetition_penalty": p.repetition_penalty, "presence_penalty": p.presence_penalty,
            "frequency_penalty": p.frequency_penalty, "min_tokens": p.min_tokens, "ignore_eos": p.ignore_eos,
            "stop": list(p.stop), "stop_token_ids": list(p.stop_token_ids), "return_token_ids": True,
            "skip_special_tokens": p.skip_special_tokens, "include_stop_str_in_output": p.include_stop_str_in_output,
        }
        if p.seed is not None:
            body["seed"] = p.seed
        if p.logprobs is not None:
            body["logprobs"] = max(p.logprobs, 0)
        return body

    async def _run(self, request_id: str, prompt: str | list[int], prompt_ids: list[int], params: SamplingParams,
                   callback: OutputCallback, metrics: RequestMetrics) -> None:
        import httpx

        out = RequestOutput(request_id=request_id, prompt=prompt if isinstance(prompt, str) else None,
                            prompt_token_ids=prompt_ids, metrics=metrics)
        want_logprobs = params.logprobs is not None
        if want_logprobs:
            out.logprobs = []
        self._counters["prompt"] += len(prompt_ids)
        try:
            async with httpx.AsyncClient(timeout=None) as client, client.stream(
                    "POST", f"{self.url}/v1/completions", json=self._body(prompt_ids, params)) as response:
                metrics.first_scheduled_time = time.monotonic()
                if response.status_code != 200:
                    detail = (await response.aread()).decode(errors="replace")
                    logger.error("vLLM refused request %s: %s", request_id, detail)
                    self._emit(out, callback, "", [], "error")
                    return
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    for choice in json.loads(line[6:]).get("choices", []):
                        ids = list(choice.get("token_ids") or [])
                        if want_logprobs and choice.get("logprobs"):
                            assert out.logprobs is not None
                            out.logprobs.extend(float(x) for x in choice["logprobs"].get("token_logprobs") or [])
                        out.stop_reason = choice.get("stop_reason")
                        self._emit(out, callback, choice.get("text") or "", ids, choice.get("finish_reason"))
            if not out.finished:
                self._emit(out, callback, "", [], "error")
        except asyncio.CancelledError:
            if not out.finished:
                self._emit(out, callback, "", [], "abort")
        except Exception:
            logger.exception("vllm backend: request %s failed", request_id)
            if not out.finished:
                self._emit(out, callback, "", [], "error")
        finally:
            self._tasks.pop(request_id, None)

    def _emit(self, out: RequestOutput, callback: OutputCallback, delta_text: str, delta_ids: list[int],
              finish_reason: str | None) -> None:
        now = time.monotonic()
        assert out.metrics is not None
        if delta_ids:
            self._counters["generated"] += len(delta_ids)
            out.metrics.first_token_time = out.metrics.first_token_time or now
            out.metrics.last_token_time = now
        out.text += delta_text
        out.token_ids = out.token_ids + delta_ids
        out.delta_text, out.delta_token_ids = delta_text, delta_ids
        out.finished = finish_reason is not None
        out.finish_reason = finish_reason
        if out.logprobs is not None:
            out.cumulative_logprob = sum(out.logprobs)
        if out.finished:
            out.metrics.finished_time = now
        if not (delta_text or delta_ids or out.finished):
            return
        snapshot = RequestOutput(**{k: getattr(out, k) for k in out.__dataclass_fields__})
        if out.logprobs is not None:
            snapshot.logprobs = list(out.logprobs)
        try:
            callback(snapshot)
        except Exception:
            logger.exception("output callback of request %s failed", out.request_id)
