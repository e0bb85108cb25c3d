"""`AsyncLLM`: one background engine loop that batches every in-flight request.

Requests arrive from any thread (Triton's python backend, an asyncio server); the loop
thread alone touches the engine. Between steps it takes new requests and aborts from a
queue, runs a step, and hands each output to its request's callback. `generate()` wraps a
callback into an async iterator; leaving the iterator early aborts the request.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config import EngineConfig
from engine.errors import InvalidRequestError
from engine.llm import open_engine
from engine.outputs import RequestOutput
from engine.runtime.sequence import Sequence
from engine.runtime.stats import EngineStats
from engine.sampling_params import SamplingParams

logger = logging.getLogger("kiln.async_llm")

OutputCallback = Callable[[RequestOutput], None]


@dataclass
class _Add:
    seq: Sequence


@dataclass
class _Abort:
    request_id: str


class AsyncLLM:
    def __init__(self, path: str | Path, **options: Any) -> None:
        self.engine, self._tmp = open_engine(path, options, "AsyncLLM")
        self._commands: queue.SimpleQueue[_Add | _Abort | None] = queue.SimpleQueue()
        self._callbacks: dict[str, OutputCallback] = {}
        self._lock = threading.Lock()
        self._stats = self.engine.stats()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kiln-engine-loop", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    # ---- thread-safe API -----------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    callback: OutputCallback, task: str | None = None) -> None:
        """Validate and enqueue a request (raises InvalidRequestError at once on bad input).
        `callback` runs on the engine thread for every output, the last one finished."""
        if self._stopped.is_set():
            raise RuntimeError("AsyncLLM is shut down")
        seq = self.engine.make_sequence(request_id, prompt, params, task=task)
        with self._lock:
            if request_id in self._callbacks:
                raise InvalidRequestError(f"request id {request_id!r} is already in use")
            self._callbacks[request_id] = callback
        self._commands.put(_Add(seq))

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def stats(self) -> EngineStats:
        """Engine counters as of the last step (cheap; safe from any thread)."""
        return self._stats

    @property
    def num_pending(self) -> int:
        with self._lock:
            return len(self._callbacks)

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str,
                       task: str | None = None) -> AsyncIterator[RequestOutput]:
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def on_output(out: RequestOutput) -> None:
            loop.call_soon_threadsafe(outputs.put_nowait, out)

        self.add_request(request_id, prompt, params, on_output, task)
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the loop; requests still in flight get a final output with finish_reason "abort"."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._commands.put(None)
        self._thread.join(timeout)
        self.engine.close()  # tensor-parallel worker processes
        if self._tmp is not None:
            self._tmp.cleanup()

    # ---- the engine thread ---------------------------------------------------------------------
    def _deliver(self, out: RequestOutput) -> None:
        with self._lock:
            callback = self._callbacks.pop(out.request_id, None) if out.finished else self._callbacks.get(
                out.request_id)
        if callback is None:
            return
        try:
            callback(out)
        except Exception:
            logger.exception("output callback of request %s failed; aborting it", out.request_id)
            if not out.finished:
                self.abort(out.request_id)

    def _handle(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Add):
            self.engine.add_sequence(command.seq)
        else:
            final = self.engine.abort_request(command.request_id)
            if final is not None:
                self._stats = self.engine.stats()
                self._deliver(final)

    def _loop(self) -> None:
        while True:
            # Block for work only when the engine is idle.
            block = not self.engine.has_unfinished_requests()
            try:
                command = self._commands.get(block=block)
                while True:
                    if command is None:
                        self._abort_all("abort")
                        return
                    self._handle(command)
                    command = self._commands.get_nowait()
            except queue.Empty:
                pass
            try:
                outputs = self.engine.step()
            except Exception:
                logger.exception("engine step failed; failing all in-flight requests")
                self._abort_all("error")
                continue
            # Refresh the snapshot first: a client that sees its final output must also see
            # its KV blocks freed in stats().
            self._stats = self.engine.stats()
            for out in outputs:
                self._deliver(out)

    def _abort_all(self, reason: str) -> None:
        for request_id in list(self.engine.sequences):
            final = self.engine.abort_request(request_id)
            if final is not None:
                final.finish_reason = reason
                self._stats = self.engine.stats()
                self._deliver(final)
        self._stats = self.engine.stats()
