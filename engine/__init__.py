"""Kiln's engine: build, load and run Llama-family models with a paged KV cache.

    from engine import LLM, SamplingParams
    llm = LLM("my-engine/")
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.errors import BuildError, CheckpointError, EngineLoadError, InvalidRequestError, KilnError
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.async_llm import AsyncLLM
    from engine.llm import LLM

__all__ = [
    "LLM",
    "AsyncLLM",
    "SamplingParams",
    "RequestOutput",
    "KilnError",
    "BuildError",
    "CheckpointError",
    "EngineLoadError",
    "InvalidRequestError",
]


def __getattr__(name: str) -> Any:
    # The runtime imports torch; keep `import engine` light for CLIs and config readers.
    if name == "LLM":
        from engine.llm import LLM

        return LLM
    if name == "AsyncLLM":
        from engine.async_llm import AsyncLLM

        return AsyncLLM
    raise AttributeError(name)
