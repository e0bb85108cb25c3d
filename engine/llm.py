"""`LLM`: offline batched generation, the API vLLM and TensorRT-LLM users know."""

from __future__ import annotations

import itertools
import tempfile
import weakref
from collections.abc import Sequence as SequenceABC
from pathlib import Path
from typing import Any

from engine.config import EngineConfig, is_engine_dir
from engine.errors import EngineLoadError, InvalidRequestError
from engine.outputs import RequestOutput
from engine.runtime.llm_engine import EngineOptions, LLMEngine
from engine.sampling_params import SamplingParams


def resolve_engine_dir(path: str | Path, options: EngineOptions) -> tuple[Path, Any]:
    """An engine dir as is; a Hugging Face checkpoint (or .gguf) is built into a temporary
    engine first. Returns (engine_dir, keep-alive handle of the temporary dir or None)."""
    path = Path(path)
    if is_engine_dir(path):
        return path, None
    if not path.exists():
        raise EngineLoadError(f"{path}: no such engine or checkpoint")
    if not (path.suffix == ".gguf" or (path / "config.json").is_file()):
        raise EngineLoadError(f"{path}: neither a Kiln engine nor a Hugging Face checkpoint (no config.json)")
    from engine.build.builder import BuildOptions, build_engine

    tmp = tempfile.TemporaryDirectory(prefix="kiln-engine-")
    build_kwargs: dict[str, Any] = {}
    if options.dtype is not None:
        build_kwargs["dtype"] = options.dtype
    if options.max_seq_len is not None:
        build_kwargs["max_seq_len"] = options.max_seq_len
    engine_dir = build_engine(path, Path(tmp.name) / "engine", BuildOptions(**build_kwargs), progress=False)
    return Path(engine_dir), tmp


def open_engine(path: str | Path, options: dict[str, Any], owner: str) -> tuple[LLMEngine, Any]:
    """Parse run-time options and load (or first build) the engine. Returns (engine, handle of
    a temporary engine dir to clean up, or None). Used by LLM and AsyncLLM."""
    try:
        opts = EngineOptions(**options)
    except TypeError as exc:
        raise InvalidRequestError(f"{owner}: {exc}") from None
    engine_dir, tmp = resolve_engine_dir(path, opts)
    try:
        return LLMEngine(engine_dir, opts), tmp
    except BaseException:
        if tmp is not None:
            tmp.cleanup()
        raise


class LLM:
    """Load an engine (or build one from a checkpoint) and generate for batches of prompts.

    All prompts of a `generate` call run together with in-flight batching; outputs come back
    in prompt order.
    """

    def __init__(self, path: str | Path, **options: Any) -> None:
        self.engine, self._tmp = open_engine(path, options, "LLM")
        self._ids = itertools.count()
        if self._tmp is not None:
            weakref.finalize(self, self._tmp.cleanup)

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    def generate(
        self,
        prompts: str | list[int] | SequenceABC[str] | SequenceABC[list[int]],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        progress: bool = False,
        tasks: str | SequenceABC[str | None] | None = None,
    ) -> list[RequestOutput]:
        """`tasks`: a prompt-tuned task of the engine for all prompts, or one (or None) per prompt."""
        prompt_list: list[Any]
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompt_list = [prompts]
        else:
            prompt_list = list(prompts)
        if sampling_params is None:
            params_list = [SamplingParams()] * len(prompt_list)
        elif isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise InvalidRequestError(
                    f"got {len(params_list)} sampling params for {len(prompt_list)} prompts"
                )
        task_list: list[str | None] = (
            [tasks] * len(prompt_list) if tasks is None or isinstance(tasks, str) else list(tasks)
        )
        if len(task_list) != len(prompt_list):
            raise InvalidRequestError(f"got {len(task_list)} tasks for {len(prompt_list)} prompts")
        order: dict[str, int] = {}
        for i, (prompt, params, task) in enumerate(zip(prompt_list, params_list, task_list, strict=True)):
            request_id = f"llm-{next(self._ids)}"
            self.engine.add_request(request_id, prompt, params, task=task)
            order[request_id] = i
        results: list[RequestOutput | None] = [None] * len(prompt_list)
        bar = _progress(len(prompt_list)) if progress else None
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        results[order[out.request_id]] = out
                        if bar is not None:
                            bar[0].advance(bar[1])
        except BaseException:
            for request_id in order:
                self.engine.abort_request(request_id)
            raise
        finally:
            if bar is not None:
                bar[0].stop()
        return [r for r in results if r is not None]


def _progress(total: int) -> tuple[Any, Any]:
    from rich.progress import Progress

    progress = Progress(transient=True)
    progress.start()
    return progress, progress.add_task("generating", total=total)
