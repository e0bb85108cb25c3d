"""The `kiln` backend: Kiln's own engine (`engine.AsyncLLM`, continuous batching, paged KV)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.runtime.stats import EngineStats
from engine.sampling_params import SamplingParams
from serving.backends.base import OutputCallback


class KilnBackend:
    """`AsyncLLM` on a Kiln engine dir, or on a checkpoint of a supported architecture (built on the fly)."""

    name = "kiln"

    def __init__(self, path: str | Path, **options: Any) -> None:
        from engine import AsyncLLM

        self.llm = AsyncLLM(path, **options)
        self.tokenizer = self.llm.tokenizer
        self.max_seq_len = self.llm.config.build.max_seq_len
        self.vocab_size = self.llm.config.model.vocab_size

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    callback: OutputCallback, task: str | None = None) -> None:
        self.llm.add_request(request_id, prompt, params, callback, task)

    def abort(self, request_id: str) -> None:
        self.llm.abort(request_id)

    def stats(self) -> EngineStats:
        return self.llm.stats()

    def shutdown(self) -> None:
        self.llm.shutdown()
