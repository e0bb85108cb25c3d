"""The `hf` backend: any causal LM that Hugging Face `transformers` can load, for models Kiln
does not run natively (Gemma, Phi, ...), with dynamic batching.

One background thread owns the model. Each loop iteration takes new requests and aborts from
a queue, prefills waiting requests one by one as they arrive (batch 1, no padding, exactly as
`generate` does; up to `max_prefill_tokens` per iteration so decodes keep moving), then runs
ONE forward pass for every request in the decode phase: the running requests are rows of a
left-padded batched `DynamicCache` (`serving.backends.hf_batch.PaddedKVBatch`) with a 2D
attention mask and per-row position ids. A finished or aborted request leaves the batch
before the next step, and a waiting request takes its slot (at most `max_batch_size` rows).
Sampling (greedy, temperature/top-k/top-p/min-p, repetition penalty, per-request seeds,
min_tokens, stop ids and strings, logprobs) is per row on the batch's logits.

Why not transformers' own continuous batching (`model.init_continuous_batching()`): tried on
transformers 5.23, CPU, float32, it runs, streams, cancels and matches greedy `generate`, but
one manager has a single `do_sample` flag and seed for all requests and only per-request
temperature/top-k/top-p — no per-request seeds, repetition penalty, min_p or min_tokens, and
a cancelled request never gets a final output. The backend contract is per-request
`SamplingParams`, so the batching is done here. Why a persistent padded batch rather than
re-batching per-request caches every step: re-batching copies every running request's whole
KV cache at every step (batch x context bytes per token), while the persistent batch copies
K/V only when a request joins or leaves.
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import InvalidRequestError
from engine.outputs import RequestMetrics, RequestOutput
from engine.runtime.stats import EngineStats
from engine.sampling_params import SamplingParams
from serving.backends.base import BackendError, OutputCallback
from serving.backends.hf_batch import PaddedKVBatch

logger = logging.getLogger("kiln.backends.hf")


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    callback: OutputCallback
    metrics: RequestMetrics
    generator: Any = None  # torch.Generator when the request has a seed
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    sent_text: str = ""  # text already handed out in deltas
    sent_tokens: int = 0


class HFBackend:
    """transformers `AutoModelForCausalLM` (float32, CPU by default) behind the `Backend` interface.

    `max_batch_size` caps the requests decoded together (others wait, FIFO);
    `max_prefill_tokens` caps the prompt tokens prefilled per loop iteration (at least one
    request is always prefilled, whatever its length).
    """

    name = "hf"

    def __init__(self, path: str | Path, dtype: str = "float32", device: str = "cpu",
                 max_batch_size: int = 64, max_prefill_tokens: int = 4096) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise BackendError(f"{path}: the hf backend needs a Hugging Face checkpoint directory (no config.json)")
        if max_batch_size < 1 or max_prefill_tokens < 1:
            raise BackendError(f"max_batch_size and max_prefill_tokens must be >= 1, got {max_batch_size}, "
                               f"{max_prefill_tokens}")
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        model: Any = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))
        self.model = model.to(device).eval()
        self.device = device
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        config = self.model.config
        self.max_seq_len = int(getattr(config, "max_position_embeddings", 2048))
        self.vocab_size = int(config.vocab_size)
        eos = self.model.generation_config.eos_token_id
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.eos_token_ids: frozenset[int] = frozenset(
            () if eos is None else (eos if isinstance(eos, list) else [eos]))
        # Prefill needs the logits of the last position only (what `generate` asks for too).
        self._last_logits_only = "logits_to_keep" in inspect.signature(self.model.forward).parameters

        self._commands: queue.SimpleQueue[tuple[str, Any] | None] = queue.SimpleQueue()
        self._requests: dict[str, _Request] = {}  # waiting and running; engine thread only
        self._waiting: deque[_Request] = deque()
        self._batch = PaddedKVBatch()  # the running requests' rows
        self._ids_lock = threading.Lock()
        self._known_ids: set[str] = set()
        self._counters = {"steps": 0, "prompt": 0, "generated": 0, "max_batch": 0, "last_batch": 0, "last_tokens": 0}
        self._stats = self._snapshot()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kiln-hf-loop", daemon=True)
        self._thread.start()

    # ---- thread-safe API -----------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    callback: OutputCallback, task: str | None = None) -> None:
        if task is not None:
            raise InvalidRequestError("prompt-tuned tasks (task_name) are served by the kiln backend only")
        if self._stopped.is_set():
            raise RuntimeError("the hf backend is shut down")
        prompt_ids = list(self.tokenizer(prompt).input_ids) if isinstance(prompt, str) else list(prompt)
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty")
        if len(prompt_ids) > self.max_seq_len - 1:
            raise InvalidRequestError(
                f"the prompt has {len(prompt_ids)} tokens; this model takes at most {self.max_seq_len - 1}")
        if any(not 0 <= t < self.vocab_size for t in prompt_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {self.vocab_size})")
        with self._ids_lock:
            if request_id in self._known_ids:
                raise InvalidRequestError(f"request id {request_id!r} is already in use")
            self._known_ids.add(request_id)
        request = _Request(request_id, prompt if isinstance(prompt, str) else None, prompt_ids, params, callback,
                           RequestMetrics(arrival_time=time.monotonic()))
        self._commands.put(("add", request))

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def stats(self) -> EngineStats:
        return self._stats

    def shutdown(self, timeout: float = 30.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._commands.put(None)
        self._thread.join(timeout)

    # ---- the loop thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        # Everything on this thread (K/V batching and sampling included) works on inference tensors.
        with self._torch.inference_mode():
            self._run()

    def _run(self) -> None:
        while True:
            if not self._take_commands():
                for request in list(self._requests.values()):
                    self._finish(request, "abort")
                self._batch.retain(self._requests)
                self._stats = self._snapshot()
                return
            self._batch.retain(self._requests)  # aborted rows leave before any compute
            prefilled = self._prefill_waiting()
            decoded = 0
            if self._batch.num_rows:
                decoded = self._batch.num_rows
                self._decode_step()
                self._batch.retain(self._requests)  # finished rows free their slots at once
            c = self._counters
            c["steps"] += 1
            c["last_batch"], c["last_tokens"] = decoded, decoded + prefilled
            c["max_batch"] = max(c["max_batch"], decoded)
            self._stats = self._snapshot()

    def _take_commands(self) -> bool:
        """Apply queued adds and aborts (waiting for one while idle); False once shut down."""
        try:
            command = self._commands.get(block=not self._requests)
            while True:
                if command is None:
                    return False
                kind, value = command
                if kind == "add":
                    self._requests[value.request_id] = value
                    self._waiting.append(value)
                elif value in self._requests:
                    self._finish(self._requests[value], "abort")
                command = self._commands.get_nowait()
        except queue.Empty:
            return True

    def _prefill_waiting(self) -> int:
        """Prefill waiting requests (FIFO) into free batch slots; returns the prompt tokens run."""
        budget = self.max_prefill_tokens
        done = 0
        while self._waiting and self._batch.num_rows < self.max_batch_size:
            request = self._waiting[0]
            if request.request_id not in self._requests:  # aborted while waiting
                self._waiting.popleft()
                continue
            if done and len(request.prompt_ids) > budget:
                break
            self._waiting.popleft()
            budget -= len(request.prompt_ids)
            done += len(request.prompt_ids)
            try:
                self._prefill(request)
            except Exception:
                logger.exception("hf backend: prefill of request %s failed", request.request_id)
                self._finish(request, "error")
        return done

    def _prefill(self, request: _Request) -> None:
        torch = self._torch
        from transformers import DynamicCache

        request.metrics.first_scheduled_time = time.monotonic()
        if request.params.seed is not None:
            request.generator = torch.Generator().manual_seed(request.params.seed)
        self._counters["prompt"] += len(request.prompt_ids)
        cache = DynamicCache()  # no config: full-length layers, which the batch can pad and merge
        extra = {"logits_to_keep": 1} if self._last_logits_only else {}
        out = self.model(input_ids=torch.tensor([request.prompt_ids], device=self.device),
                         past_key_values=cache, use_cache=True, **extra)
        self._advance(request, out.logits[0, -1].float())  # (vocab,)
        if request.request_id in self._requests:  # not finished by its first token
            self._batch.add(request.request_id, cache)

    def _decode_step(self) -> None:
        """One forward pass for every row of the batch: each row's last token at its own position."""
        torch = self._torch
        rows = [self._requests[rid] for rid in self._batch.request_ids]
        input_ids = torch.tensor([[r.token_ids[-1]] for r in rows], device=self.device)  # (B, 1)
        positions = torch.tensor([[len(r.prompt_ids) + len(r.token_ids) - 1] for r in rows],
                                 device=self.device)  # (B, 1): real position, padding excluded
        mask = self._batch.attention_mask().to(self.device)  # (B, W+1)
        try:
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                             past_key_values=self._batch.cache, use_cache=True)
        except Exception:
            logger.exception("hf backend: batched decode step failed; ending its %d requests", len(rows))
            for request in rows:
                self._finish(request, "error")
            return
        logits = out.logits[:, -1].float()  # (B, vocab)
        for i, request in enumerate(rows):
            try:
                self._advance(request, logits[i])
            except Exception:
                logger.exception("hf backend: request %s failed", request.request_id)
                self._finish(request, "error")

    def _advance(self, request: _Request, logits: Any) -> None:
        """Sample the next token of `request` from its logits (vocab,) and hand out what is new."""
        token = self._sample(logits, request)
        request.token_ids.append(token)
        self._counters["generated"] += 1
        stamp = time.monotonic()
        if request.metrics.first_token_time is None:
            request.metrics.first_token_time = stamp
        request.metrics.last_token_time = stamp
        params = request.params
        num = len(request.token_ids)
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            if num > params.min_tokens:
                self._emit(request, "stop", stop_reason=token, drop_last=True)
                return
        text = self._decode(request, request.token_ids)
        for stop in params.stop if num > params.min_tokens else ():
            at = text.find(stop)
            if at >= 0:
                cut = at + len(stop) if params.include_stop_str_in_output else at
                self._emit(request, "stop", stop_reason=stop, text=text[:cut])
                return
        if num >= params.max_tokens or len(request.prompt_ids) + num >= self.max_seq_len:
            self._emit(request, "length", text=text)
            return
        self._emit(request, None, text=text)

    def _sample(self, logits: Any, request: _Request) -> int:
        torch = self._torch
        params = request.params
        if params.repetition_penalty != 1.0 and request.token_ids:
            seen = torch.tensor(sorted(set(request.token_ids + request.prompt_ids)))
            values = logits[seen]
            logits[seen] = torch.where(values > 0, values / params.repetition_penalty,
                                       values * params.repetition_penalty)
        if len(request.token_ids) < params.min_tokens:
            banned = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
            if banned:
                logits[torch.tensor(sorted(banned))] = float("-inf")
        if params.greedy:
            token = int(torch.argmax(logits))
        else:
            scaled = logits / params.temperature
            if params.top_k > 0:
                kth = torch.topk(scaled, min(params.top_k, scaled.numel())).values[-1]
                scaled = scaled.masked_fill(scaled < kth, float("-inf"))
            probs = torch.softmax(scaled, dim=-1)
            if params.top_p < 1.0:
                sorted_probs, order = torch.sort(probs, descending=True)
                drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs > params.top_p
                probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
            if params.min_p > 0.0:
                probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
            token = int(torch.multinomial(probs / probs.sum(), 1, generator=request.generator))
        if params.logprobs is not None:
            request.logprobs.append(float(torch.log_softmax(logits, dim=-1)[token]))
        return token

    def _decode(self, request: _Request, token_ids: list[int]) -> str:
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=request.params.skip_special_tokens))

    def _emit(self, request: _Request, finish_reason: str | None, text: str | None = None,
              stop_reason: str | int | None = None, drop_last: bool = False) -> None:
        """Hand out what is new since the last output; a finish reason ends the request."""
        if text is None:
            text = self._decode(request, request.token_ids[:-1] if drop_last else request.token_ids)
        visible = text
        if finish_reason is None:
            # Hold back an incomplete UTF-8 character and what could still become a stop string.
            hold = max((len(s) - 1 for s in request.params.stop), default=0)
            visible = text[: len(text) - hold] if hold else text
            while visible.endswith("\ufffd"):
                visible = visible[:-1]
        if not visible.startswith(request.sent_text):
            visible = request.sent_text  # decoding changed earlier text (rare); never take back
        delta_text = visible[len(request.sent_text):]
        delta_ids = request.token_ids[request.sent_tokens:]
        if finish_reason is None and not delta_text:
            return  # nothing printable yet; these tokens go out with the next output
        request.sent_text, request.sent_tokens = visible, len(request.token_ids)
        if finish_reason is not None:
            request.metrics.finished_time = time.monotonic()
        want_logprobs = request.params.logprobs is not None
        self._deliver(request, RequestOutput(
            request_id=request.request_id, prompt=request.prompt, prompt_token_ids=request.prompt_ids,
            text=visible, token_ids=list(request.token_ids), delta_text=delta_text, delta_token_ids=delta_ids,
            finished=finish_reason is not None, finish_reason=finish_reason, stop_reason=stop_reason,
            logprobs=list(request.logprobs) if want_logprobs else None,
            cumulative_logprob=sum(request.logprobs) if want_logprobs else None,
            metrics=request.metrics,
        ))

    def _finish(self, request: _Request, finish_reason: str) -> None:
        self._emit(request, finish_reason, text=request.sent_text)

    def _deliver(self, request: _Request, output: RequestOutput) -> None:
        if output.finished:
            self._requests.pop(request.request_id, None)
            # Its batch row (K/V) is dropped by the loop before the next forward pass.
            with self._ids_lock:
                self._known_ids.discard(request.request_id)
            self._stats = self._snapshot()
        try:
            request.callback(output)
        except Exception:
            logger.exception("output callback of request %s failed; aborting it", request.request_id)
            if not output.finished:
                self.abort(request.request_id)

    def _snapshot(self) -> EngineStats:
        c = self._counters
        running = sum(1 for rid in self._batch.request_ids if rid in self._requests)  # finished rows leave later
        return EngineStats(
            num_running=running, num_waiting=len(self._requests) - running,
            num_total_blocks=0, num_free_blocks=0,
            kv_cache_usage=0.0, prefix_cache_queries=0, prefix_cache_hits=0, num_preemptions=0,
            num_steps=c["steps"], last_batch_size=c["last_batch"], last_num_tokens=c["last_tokens"],
            max_batch_size_seen=c["max_batch"], total_prompt_tokens=c["prompt"],
            total_generation_tokens=c["generated"],
        )
