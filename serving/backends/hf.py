"""The `hf` backend: any causal LM that Hugging Face `transformers` can load, for models Kiln
does not run natively (Gemma, Phi, ...).

One background thread owns the model. Each request keeps its own `DynamicCache`; every loop
iteration takes new requests and aborts from a queue, then advances each running request by
one token (prefill on its first turn), interleaving requests token by token so that every
stream makes progress and a new request starts at once. Requests are not fused into one
forward pass (different cache lengths would need padding); this backend is the fallback for
correctness and reach, not for speed.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import InvalidRequestError
from engine.outputs import RequestMetrics, RequestOutput
from engine.runtime.stats import EngineStats
from engine.sampling_params import SamplingParams
from serving.backends.base import BackendError, OutputCallback

logger = logging.getLogger("kiln.backends.hf")


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    callback: OutputCallback
    metrics: RequestMetrics
    cache: Any = None  # transformers DynamicCache, created at prefill
    generator: Any = None  # torch.Generator when the request has a seed
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    sent_text: str = ""  # text already handed out in deltas
    sent_tokens: int = 0


class HFBackend:
    """transformers `AutoModelForCausalLM` in float32 on CPU behind the `Backend` interface."""

    name = "hf"

    def __init__(self, path: str | Path, dtype: str = "float32", device: str = "cpu") -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise BackendError(f"{path}: the hf backend needs a Hugging Face checkpoint directory (no config.json)")
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        model: Any = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))
        self.model = model.to(device).eval()
        self.device = device
        config = self.model.config
        self.max_seq_len = int(getattr(config, "max_position_embeddings", 2048))
        self.vocab_size = int(config.vocab_size)
        eos = self.model.generation_config.eos_token_id
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.eos_token_ids: frozenset[int] = frozenset(
            () if eos is None else (eos if isinstance(eos, list) else [eos]))

        self._commands: queue.SimpleQueue[tuple[str, Any] | None] = queue.SimpleQueue()
        self._requests: dict[str, _Request] = {}  # engine thread only
        self._ids_lock = threading.Lock()
        self._known_ids: set[str] = set()
        self._counters = {"steps": 0, "prompt": 0, "generated": 0, "max_batch": 0, "last_batch": 0}
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
        while True:
            try:
                command = self._commands.get(block=not self._requests)
                while True:
                    if command is None:
                        for request_id in list(self._requests):
                            self._finish(self._requests[request_id], "abort")
                        return
                    kind, value = command
                    if kind == "add":
                        self._requests[value.request_id] = value
                    elif value in self._requests:
                        self._finish(self._requests[value], "abort")
                    command = self._commands.get_nowait()
            except queue.Empty:
                pass
            running = list(self._requests.values())
            self._counters["steps"] += 1
            self._counters["last_batch"] = len(running)
            self._counters["max_batch"] = max(self._counters["max_batch"], len(running))
            for request in running:
                try:
                    self._step(request)
                except Exception:
                    logger.exception("hf backend: request %s failed", request.request_id)
                    self._finish(request, "error")
            self._stats = self._snapshot()

    def _step(self, request: _Request) -> None:
        torch = self._torch
        now = time.monotonic()
        if request.cache is None:
            from transformers import DynamicCache

            request.cache = DynamicCache()
            request.metrics.first_scheduled_time = now
            if request.params.seed is not None:
                request.generator = torch.Generator().manual_seed(request.params.seed)
            new_ids = request.prompt_ids
            self._counters["prompt"] += len(new_ids)
        else:
            new_ids = request.token_ids[-1:]
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([new_ids], device=self.device),
                             past_key_values=request.cache, use_cache=True)
        logits = out.logits[0, -1].float()  # [vocab]
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
        logprobs = torch.log_softmax(logits, dim=-1)
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
        request.logprobs.append(float(logprobs[token]))
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
            request.cache = None  # frees its KV tensors
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
        return EngineStats(
            num_running=len(self._requests), num_waiting=0, num_total_blocks=0, num_free_blocks=0,
            kv_cache_usage=0.0, prefix_cache_queries=0, prefix_cache_hits=0, num_preemptions=0,
            num_steps=c["steps"], last_batch_size=c["last_batch"], last_num_tokens=c["last_batch"],
            max_batch_size_seen=c["max_batch"], total_prompt_tokens=c["prompt"],
            total_generation_tokens=c["generated"],
        )
