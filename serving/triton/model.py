"""The Triton python-backend model that serves a Kiln engine (`TritonPythonModel` of the
repositories `kiln repo` writes).

Threads of one model instance (one stub process):
- Triton's thread calls `execute()`, which only parses, tokenizes and enqueues each request
  into the instance's single `AsyncLLM`; the engine's background loop batches every request
  in flight (continuous batching).
- the engine thread calls our per-request callback with each `RequestOutput`; the callback
  only timestamps it and puts it on the outbox queue, so the engine never waits on Triton.
- the responder thread drains the outbox and sends responses through each request's response
  sender (decoupled) or hands the final response to `execute()` (not decoupled). It is the
  only thread that sends, so every request gets exactly one final response.
- the watcher thread wakes every `WATCH_INTERVAL_S` to abort requests whose client went away
  (`is_cancelled()`), publish metrics (each update is a call into the server, kept off the
  streaming path), and, when the stub receives SIGTERM/SIGINT
  (the launcher signals the server's whole process group), abort everything in flight with a
  "shutting down" error so that Triton can unload at once instead of draining.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import queue
import select
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from engine.errors import KilnError
from engine.outputs import RequestOutput
from serving.metrics import KilnMetrics
from serving.triton.request import DEFAULT_MAX_TOKENS, check_length, parse_request
from serving.triton.responses import Stream, build_response, error_response

logger = logging.getLogger("kiln.triton")

# Cancellation is polled (one call into the server per in-flight request) at this period;
# metrics are published every METRICS_EVERY ticks.
WATCH_INTERVAL_S = 0.05
METRICS_EVERY = 4
SHUTDOWN_MESSAGE = "request aborted: the Triton server is shutting down"


@dataclass(frozen=True)
class _Close:
    """Ask the responder to end a request now with an error (client gone, or shutdown)."""

    request_id: str
    message: str
    code: str
    finish_reason: str = "abort"


_STOP = object()


class KilnTritonModel:
    """Triton's python-backend interface: `initialize(args)`, `execute(requests)`, `finalize()`."""

    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        from serving.backends import open_backend

        self.pb_utils = pb_utils
        model_config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}
        if "engine_dir" not in parameters:
            raise KilnError("config.pbtxt has no 'engine_dir' parameter; regenerate the repository with kiln repo")
        self.model_name = args["model_name"]
        self.instance_name = args.get("model_instance_name", self.model_name)
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(model_config)
        self.default_max_tokens = int(parameters.get("default_max_tokens", DEFAULT_MAX_TOKENS))
        # The backend (serving.backends: kiln = AsyncLLM, hf = transformers) written by kiln repo.
        self.llm = open_backend(parameters.get("backend", "kiln"), parameters["engine_dir"])
        self.tokenizer = self.llm.tokenizer
        self.max_seq_len = self.llm.max_seq_len
        self.vocab_size = self.llm.vocab_size
        self.metrics = KilnMetrics(pb_utils, self.model_name, self.instance_name)

        self._streams: dict[str, Stream] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._id_prefix = f"{self.instance_name}-{os.getpid()}-"
        self._outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stop_watching = threading.Event()
        self._shutting_down = False
        self._signal_pipe = self._install_signal_wakeup()
        self._responder = threading.Thread(target=self._respond_loop, name="kiln-responder", daemon=True)
        self._watcher = threading.Thread(target=self._watch_loop, name="kiln-watcher", daemon=True)
        self._responder.start()
        self._watcher.start()

    # -- execute: parse and enqueue only --------------------------------------------------
    def execute(self, requests: list[Any]) -> list[Any] | None:
        admitted: list[Stream | Any] = []  # a Stream, or the error response refusing the request
        for triton_request in requests:
            sender = triton_request.get_response_sender() if self.decoupled else None
            try:
                admitted.append(self._admit(triton_request, sender))
            except Exception as exc:  # refuse this request, keep serving the others
                invalid = isinstance(exc, KilnError | ValueError)
                if not invalid:
                    logger.exception("kiln: could not enqueue a request")
                response = error_response(self.pb_utils, str(exc) if invalid else f"internal error: {exc!r}",
                                          "INVALID_ARG" if invalid else "INTERNAL")
                if sender is not None:
                    self._send_final(sender, response)
                admitted.append(response)
        if self.decoupled:
            return None
        # Not decoupled: Triton wants one response per request from execute(); wait for them.
        responses = []
        for entry in admitted:
            if isinstance(entry, Stream):
                assert entry.response_ready is not None
                entry.response_ready.wait()
                entry = entry.response
            responses.append(entry)
        return responses

    def _admit(self, triton_request: Any, sender: Any | None) -> Stream:
        """Parse, validate and enqueue one request; raise InvalidRequestError to refuse it."""
        if self._shutting_down:
            raise KilnError("the Triton server is shutting down; not accepting requests")
        inputs = {tensor.name(): tensor.as_numpy() for tensor in triton_request.inputs()}
        request = parse_request(inputs, self.vocab_size, self.default_max_tokens)
        if request.stream and not self.decoupled:
            raise KilnError(
                "stream=true needs a decoupled model; this repository was written with --no-decoupled"
            )
        prompt_ids = list(self.tokenizer(request.prompt).input_ids)
        check_length(len(prompt_ids), request.params.max_tokens, self.max_seq_len)
        request_id = self._id_prefix + str(next(self._ids))
        stream = Stream(
            request_id=request_id,
            request=request,
            triton_request=triton_request,
            num_prompt_tokens=len(prompt_ids),
            sender=sender,
            response_ready=None if self.decoupled else threading.Event(),
        )
        with self._lock:
            self._streams[request_id] = stream
        try:
            self.llm.add_request(request_id, prompt_ids, request.params, self._on_output, request.task)
        except BaseException:
            with self._lock:
                self._streams.pop(request_id, None)
            raise
        return stream

    def _on_output(self, output: RequestOutput) -> None:
        # Engine thread: stamp and hand off, nothing else.
        self._outbox.put((time.monotonic(), output))

    # -- responder: the only thread that answers ------------------------------------------
    def _respond_loop(self) -> None:
        while True:
            batch = [self._outbox.get()]
            while True:
                try:
                    batch.append(self._outbox.get_nowait())
                except queue.Empty:
                    break
            # Outputs of one request that queued up while we were sending go out as one
            # response: under load, fewer and larger responses instead of falling behind.
            per_request: dict[str, list[tuple[float, RequestOutput]]] = {}
            closes: list[_Close] = []
            stop = False
            for entry in batch:
                if entry is _STOP:
                    stop = True
                elif isinstance(entry, _Close):
                    closes.append(entry)
                else:
                    per_request.setdefault(entry[1].request_id, []).append(entry)
            for request_id, outputs in per_request.items():
                self._guarded(self._handle_outputs, request_id, outputs)
            for close in closes:
                self._guarded(self._close, close)
            if stop:
                return

    def _guarded(self, handler: Any, *args: Any) -> None:
        try:
            handler(*args)
        except Exception:  # one bad response must not stop the responder
            logger.exception("kiln: failed to answer a request")

    def _handle_outputs(self, request_id: str, outputs: list[tuple[float, RequestOutput]]) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is None or stream.closed:
            return
        for arrived, output in outputs:
            if output.delta_token_ids:
                stream.token_ids.extend(output.delta_token_ids)
                if stream.last_token_time is not None:
                    self.metrics.record_inter_token(arrived - stream.last_token_time)
                stream.last_token_time = arrived
        last = outputs[-1][1]
        if last.finished and last.finish_reason == "abort" and stream.aborting:
            return  # we aborted it: its close (queued first, handled after this batch's outputs) answers
        delta_text = "".join(output.delta_text for _, output in outputs)
        if len(outputs) > 1:
            last = dataclasses.replace(last, delta_text=delta_text)
        if last.finished:
            self._finish(stream, last)
        elif stream.request.stream and delta_text and stream.sender is not None:
            stream.sender.send(build_response(self.pb_utils, stream, last))

    def _finish(self, stream: Stream, output: RequestOutput) -> None:
        reason = output.finish_reason or "stop"
        if reason == "error":
            response = error_response(self.pb_utils, "the engine failed while generating this request", "INTERNAL")
        else:
            response = build_response(self.pb_utils, stream, output)
        self._deliver(stream, response)
        m = output.metrics
        self.metrics.record_finished(
            reason,
            queue_time=None if m is None or m.first_scheduled_time is None else m.first_scheduled_time - m.arrival_time,
            ttft=None if m is None or m.first_token_time is None else m.first_token_time - m.arrival_time,
            e2e=None if m is None or m.last_token_time is None else m.last_token_time - m.arrival_time,
        )

    def _close(self, close: _Close) -> None:
        with self._lock:
            stream = self._streams.get(close.request_id)
        if stream is None or stream.closed:
            return
        self._deliver(stream, error_response(self.pb_utils, close.message, close.code))
        self.metrics.record_finished(close.finish_reason, None, None, None)

    def _deliver(self, stream: Stream, response: Any) -> None:
        """Send the final response (decoupled) or hand it to execute(); forget the stream."""
        stream.closed = True
        with self._lock:
            self._streams.pop(stream.request_id, None)
        if stream.sender is not None:
            self._send_final(stream.sender, response)
        else:
            assert stream.response_ready is not None
            stream.response = response
            stream.response_ready.set()

    def _send_final(self, sender: Any, response: Any) -> None:
        try:
            sender.send(response, flags=self.pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as exc:  # the client went away; nothing left to tell it
            logger.debug("kiln: final response not delivered: %s", exc)

    # -- watcher: cancellation, gauges, shutdown signal ------------------------------------
    def _install_signal_wakeup(self) -> tuple[socket.socket, socket.socket] | None:
        """Route SIGTERM/SIGINT of this stub to a socket the watcher selects on.

        Python runs signal handlers only in the main thread, but `set_wakeup_fd` makes the C
        handler write the signal number to a socket that any thread can wait on.
        """
        if threading.current_thread() is not threading.main_thread():
            logger.warning("kiln: initialize() is not on the main thread; shutdown will drain requests")
            return None
        receiver, writer = socket.socketpair()
        writer.setblocking(False)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: None)
        signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        return receiver, writer

    def _watch_loop(self) -> None:
        receiver = self._signal_pipe[0] if self._signal_pipe else None
        for tick in itertools.count():
            if self._stop_watching.is_set():
                return
            if receiver is not None:
                readable, _, _ = select.select([receiver], [], [], WATCH_INTERVAL_S)
                if readable and receiver.recv(64):
                    self._begin_shutdown()
            else:
                self._stop_watching.wait(WATCH_INTERVAL_S)
            try:
                self._abort_cancelled()
                if tick % METRICS_EVERY == 0:
                    self.metrics.flush(self.llm.stats())
            except Exception:
                logger.exception("kiln: watcher tick failed")

    def _abort_cancelled(self) -> None:
        with self._lock:
            streams = [s for s in self._streams.values() if not (s.closed or s.aborting)]
        for stream in streams:
            cancelled = (stream.sender.is_cancelled() if stream.sender is not None
                         else stream.triton_request.is_cancelled())
            if cancelled:
                # The close is queued before the engine's own "abort" output can be.
                stream.aborting = True
                self._outbox.put(_Close(stream.request_id, "request cancelled by the client", "CANCELLED"))
                self.llm.abort(stream.request_id)

    def _begin_shutdown(self) -> None:
        if self._shutting_down:
            return
        self._shutting_down = True
        logger.info("kiln: stop signal received; aborting requests in flight")
        self._abort_all(SHUTDOWN_MESSAGE)

    def _abort_all(self, message: str) -> None:
        with self._lock:
            streams = [s for s in self._streams.values() if not (s.closed or s.aborting)]
        for stream in streams:
            stream.aborting = True
            request_id = stream.request_id
            self._outbox.put(_Close(request_id, message, "UNAVAILABLE"))
            self.llm.abort(request_id)

    # -- finalize ----------------------------------------------------------------------------
    def finalize(self) -> None:
        self._shutting_down = True
        self._abort_all(SHUTDOWN_MESSAGE)
        self.llm.shutdown()
        self._stop_watching.set()
        self._watcher.join(timeout=2)
        self._outbox.put(_STOP)
        self._responder.join(timeout=2)
        self.metrics.close()
        if self._signal_pipe is not None:
            signal.set_wakeup_fd(-1)
            for sock in self._signal_pipe:
                sock.close()
