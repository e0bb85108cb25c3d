"""The synchronous engine: requests in, one `step()` at a time, RequestOutputs out."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine.config import EngineConfig, load_engine_config
from engine.errors import EngineLoadError, InvalidRequestError
from engine.outputs import RequestOutput
from engine.parallel import get_tp_size
from engine.quant.kv_cache import kv_storage
from engine.runtime.block_manager import BlockManager
from engine.runtime.detokenizer import IncrementalDetokenizer
from engine.runtime.kv_pool import plan_kv_pool
from engine.runtime.model_runner import TORCH_DTYPES, KVCacheSpec, ModelRunner
from engine.runtime.sampler import Sampler
from engine.runtime.scheduler import ScheduledSequence, Scheduler, SchedulerConfig
from engine.runtime.sequence import Sequence, SequenceStatus
from engine.runtime.stats import EngineStats
from engine.runtime.weights import load_prompt_table
from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.distributed.executor import TensorParallelExecutor

logger = logging.getLogger("kiln.engine")


@dataclass(frozen=True)
class EngineOptions:
    """Run-time choices; limits may only be lowered below what the engine was built for."""

    device: str | None = None  # "cpu", "cuda", "cuda:1"; None: CUDA when available
    dtype: str | None = None  # None: the build dtype
    max_batch_size: int | None = None
    max_seq_len: int | None = None
    max_num_tokens: int | None = None
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    seed: int = 0
    check_invariants: bool = False  # run the block-pool invariant checker after every step


def load_tokenizer(engine_dir: str | Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(engine_dir))
    except Exception as exc:  # transformers raises many types for broken tokenizer files
        raise EngineLoadError(f"{engine_dir}: cannot load the tokenizer ({exc})") from None


def _apply_overrides(config: EngineConfig, options: EngineOptions) -> EngineConfig:
    build = config.build
    overrides: dict[str, int] = {}
    for name in ("max_batch_size", "max_seq_len", "max_num_tokens"):
        value = getattr(options, name)
        if value is None:
            continue
        if value <= 0:
            raise InvalidRequestError(f"{name} must be positive, got {value}")
        built = getattr(build, name)
        if name == "max_seq_len" and value > built:
            raise InvalidRequestError(f"max_seq_len {value} exceeds the engine's built max_seq_len {built}")
        overrides[name] = value
    return config.with_build(**overrides) if overrides else config


class LLMEngine:
    def __init__(self, engine_dir: str | Path, options: EngineOptions | None = None) -> None:
        options = options or EngineOptions()
        self.engine_dir = Path(engine_dir)
        self.options = options
        self.config = _apply_overrides(load_engine_config(engine_dir), options)
        # Prompt-tuned tasks: {task: number of virtual tokens}
        self.prompt_tasks = {name: t.shape[0] for name, t in load_prompt_table(engine_dir, self.config.model).items()}
        self.tokenizer = load_tokenizer(engine_dir)
        build = self.config.build
        self.device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype_name = options.dtype or build.dtype
        if dtype_name not in TORCH_DTYPES:
            raise InvalidRequestError(f"dtype must be one of {list(TORCH_DTYPES)}, got {dtype_name!r}")
        self.dtype = TORCH_DTYPES[dtype_name]
        model = self.config.model
        self.eos_token_ids = tuple(model.eos_token_ids) or (
            (self.tokenizer.eos_token_id,) if self.tokenizer.eos_token_id is not None else ()
        )

        cache_dtype, scale_dtype = kv_storage(build.quantization.kv_cache_dtype, self.dtype)
        spec = KVCacheSpec(model.num_layers, model.num_kv_heads, model.head_dim, build.kv_block_size, cache_dtype,
                           scale_dtype)
        self.kv_pool = plan_kv_pool(spec, build.max_batch_size, build.max_seq_len, self.device,
                                    options.num_kv_blocks, options.kv_cache_memory_bytes)
        logger.info("KV cache: %s", self.kv_pool.describe())
        self.runner: ModelRunner | TensorParallelExecutor
        if build.tp_size > 1:  # worker processes + collectives only for tensor-parallel engines
            from engine.distributed.executor import TensorParallelExecutor

            self.runner = TensorParallelExecutor(engine_dir, self.config, self.device, self.dtype,
                                                 self.kv_pool.num_blocks)
        elif get_tp_size() != 1:
            raise EngineLoadError(
                f"{engine_dir}: a tensor-parallel engine is open in this process (its model layers are "
                "sharded process-wide); close it before loading another engine"
            )
        else:
            self.runner = ModelRunner(engine_dir, self.config, self.device, self.dtype, self.kv_pool.num_blocks)
        self.block_manager = BlockManager(self.kv_pool.num_blocks, build.kv_block_size,
                                          options.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(build.max_batch_size, build.max_num_tokens, build.max_seq_len,
                            options.enable_chunked_prefill),
            self.block_manager,
        )
        self.sampler = Sampler(options.seed)
        self.sequences: dict[str, Sequence] = {}
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._num_steps = 0
        self._last_batch_size = 0
        self._last_num_tokens = 0
        self._max_batch_size_seen = 0
        self._total_prompt_tokens = 0
        self._total_generation_tokens = 0

    # ---- requests --------------------------------------------------------------------------
    def make_sequence(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                      arrival_time: float | None = None, task: str | None = None) -> Sequence:
        """Tokenize and validate a request without touching engine state (thread-safe).
        `task` selects a prompt-tuned task of the engine (its virtual tokens precede the prompt)."""
        num_virtual = 0
        if task is not None:
            if task not in self.prompt_tasks:
                known = ", ".join(sorted(self.prompt_tasks)) or "none (build with --prompt-table NAME=ADAPTER)"
                raise InvalidRequestError(f"unknown task {task!r}; this engine's tasks: {known}")
            num_virtual = self.prompt_tasks[task]
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty")
            token_ids = self.tokenizer(prompt).input_ids
            text: str | None = prompt
        else:
            token_ids, text = list(prompt), None
            vocab = self.config.model.vocab_size
            bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise InvalidRequestError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
        if not token_ids:
            raise InvalidRequestError("prompt is empty (no tokens)")
        max_seq_len = self.config.build.max_seq_len - num_virtual
        if len(token_ids) >= max_seq_len:
            raise InvalidRequestError(
                f"prompt has {len(token_ids)} tokens but this engine's max_seq_len is {max_seq_len} "
                f"(prompt must be at most {max_seq_len - 1} tokens)"
            )
        total = min(num_virtual + len(token_ids) + params.max_tokens, self.config.build.max_seq_len)
        if self.block_manager.blocks_needed(total) > self.block_manager.num_blocks:
            raise InvalidRequestError(
                f"request needs {total} tokens of KV cache but the pool holds only "
                f"{self.block_manager.num_blocks * self.block_manager.block_size}"
            )
        seq = Sequence(request_id, token_ids, params, prompt=text, arrival_time=arrival_time, task=task,
                       num_virtual_tokens=num_virtual)
        seq.bad_words_token_ids = self._bad_words_token_ids(params.bad_words)
        return seq

    def _bad_words_token_ids(self, words: tuple[str, ...]) -> list[list[int]]:
        ids: list[list[int]] = []
        for word in words:
            for variant in (word, " " + word.lstrip()):
                encoded = self.tokenizer(variant, add_special_tokens=False).input_ids
                if encoded and encoded not in ids:
                    ids.append(encoded)
        return ids

    def add_sequence(self, seq: Sequence) -> None:
        if seq.request_id in self.sequences:
            raise InvalidRequestError(f"request id {seq.request_id!r} is already in use")
        self.sequences[seq.request_id] = seq
        self.detokenizers[seq.request_id] = IncrementalDetokenizer(
            self.tokenizer, seq.prompt_token_ids, seq.params.stop, seq.params.skip_special_tokens,
            seq.params.include_stop_str_in_output,
        )
        self.scheduler.add(seq)
        self._total_prompt_tokens += seq.num_prompt_tokens

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None, task: str | None = None) -> None:
        self.add_sequence(self.make_sequence(request_id, prompt, params or SamplingParams(), arrival_time, task))

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its KV blocks. Returns its final output (None if unknown)."""
        seq = self.sequences.get(request_id)
        if seq is None:
            return None
        self.scheduler.finish(seq, SequenceStatus.FINISHED_ABORTED)
        return self._finalize(seq, [])

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step ----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; return an output for every request that produced tokens
        or finished in it."""
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        logits, sampling = self.runner.execute(sched.scheduled)
        for s in sched.scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens
            self.block_manager.register_full_blocks(s.seq)
        outputs: list[RequestOutput] = []
        if sampling:
            seqs = [s.seq for s in sampling]
            result = self.sampler(logits, seqs, self.eos_token_ids)
            now = time.monotonic()
            for i, seq in enumerate(seqs):
                top = result.top_logprobs[i]
                logprob = result.logprobs[i] if result.logprobs is not None else None
                outputs.append(self._append_token(seq, result.token_ids[i], logprob, top, now))
        self._num_steps += 1
        self._last_batch_size = len(sched.scheduled)
        self._last_num_tokens = sched.num_tokens
        self._max_batch_size_seen = max(self._max_batch_size_seen, len(sched.scheduled))
        if self.options.check_invariants:
            self.scheduler.check_integrity()
        return outputs

    def _append_token(self, seq: Sequence, token: int, logprob: float | None,
                      top: dict[int, float] | None, now: float) -> RequestOutput:
        params = seq.params
        seq.append_token(token)
        self._total_generation_tokens += 1
        if seq.metrics.first_token_time is None:
            seq.metrics.first_token_time = now
        seq.metrics.last_token_time = now
        if params.logprobs is not None and logprob is not None:
            seq.logprobs.append(logprob)
            seq.top_logprobs.append(top or {})
            seq.cumulative_logprob += logprob
        new_tokens = [token]
        detok = self.detokenizers[seq.request_id]
        status: SequenceStatus | None = None
        allowed_to_stop = seq.num_output_tokens >= params.min_tokens
        if token in self.eos_token_ids and not params.ignore_eos and allowed_to_stop:
            status = SequenceStatus.FINISHED_STOPPED
        elif token in params.stop_token_ids and allowed_to_stop:
            status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, token
        else:
            detok.add_token(token)
            if detok.stopped_by is not None and allowed_to_stop:
                status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, detok.stopped_by
        if status is None and (seq.num_output_tokens >= params.max_tokens
                               or seq.num_tokens >= self.config.build.max_seq_len):
            status = SequenceStatus.FINISHED_LENGTH
        if status is not None:
            self.scheduler.finish(seq, status)
            return self._finalize(seq, new_tokens)
        return self._snapshot(seq, new_tokens, detok.take_delta(finished=False))

    def _finalize(self, seq: Sequence, new_tokens: list[int]) -> RequestOutput:
        seq.metrics.finished_time = time.monotonic()
        detok = self.detokenizers.pop(seq.request_id)
        del self.sequences[seq.request_id]
        return self._snapshot(seq, new_tokens, detok.take_delta(finished=True), detok.output_text)

    def _snapshot(self, seq: Sequence, new_tokens: list[int], delta: str, text: str | None = None) -> RequestOutput:
        detok = self.detokenizers.get(seq.request_id)
        want_logprobs = seq.params.logprobs is not None
        return RequestOutput(
            request_id=seq.request_id,
            prompt=seq.prompt,
            prompt_token_ids=seq.prompt_token_ids,
            text=text if text is not None else (detok.output_text if detok else ""),
            token_ids=seq.output_token_ids,
            delta_text=delta,
            delta_token_ids=new_tokens,
            finished=seq.is_finished,
            finish_reason=seq.status.finish_reason,
            stop_reason=seq.stop_reason,
            logprobs=list(seq.logprobs) if want_logprobs else None,
            top_logprobs=list(seq.top_logprobs) if want_logprobs else None,
            cumulative_logprob=seq.cumulative_logprob if want_logprobs else None,
            num_cached_tokens=seq.num_cached_tokens,
            metrics=seq.metrics,
        )

    @torch.inference_mode()
    def score(self, token_ids: list[int]) -> torch.Tensor:
        """Float32 logits (T, V) at every position of `token_ids`, computed through the paged
        cache like any prefill (for perplexity and parity checks). Call only between steps."""
        seq = Sequence("__score__", token_ids, SamplingParams(max_tokens=1))
        if not self.block_manager.allocate_slots(seq, len(token_ids)):
            raise InvalidRequestError(f"{len(token_ids)} tokens do not fit into the free KV blocks")
        try:
            logits, _ = self.runner.execute([ScheduledSequence(seq, len(token_ids))], all_logits=True)
        finally:
            self.block_manager.free(seq)
        return logits

    def close(self) -> None:
        """Stop a tensor-parallel engine's worker processes (nothing to do at tp_size 1). Idempotent."""
        if not isinstance(self.runner, ModelRunner):
            self.runner.close()

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_total_blocks=bm.num_blocks,
            num_free_blocks=bm.num_free_blocks,
            kv_cache_usage=bm.usage,
            prefix_cache_queries=bm.prefix_cache_queries,
            prefix_cache_hits=bm.prefix_cache_hits,
            num_preemptions=self.scheduler.num_preemptions,
            num_steps=self._num_steps,
            last_batch_size=self._last_batch_size,
            last_num_tokens=self._last_num_tokens,
            max_batch_size_seen=self._max_batch_size_seen,
            total_prompt_tokens=self._total_prompt_tokens,
            total_generation_tokens=self._total_generation_tokens,
        )
