"""One prompt in, one completion out, with the timings `kiln generate` and the demo print."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine.errors import InvalidRequestError
from engine.llm import LLM
from engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class GenerateRequest:
    engine: Path
    prompt: str
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    chat: bool = False
    device: str | None = None
    dtype: str | None = None


@dataclass(frozen=True)
class GenerateResult:
    text: str
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    ttft_s: float
    total_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        decode_time = self.total_s - self.ttft_s
        return (self.num_output_tokens - 1) / decode_time if decode_time > 0 and self.num_output_tokens > 1 else 0.0


def chat_prompt(llm: LLM, user_message: str) -> str:
    template = getattr(llm.tokenizer, "chat_template", None)
    if not template:
        raise InvalidRequestError("this engine's tokenizer has no chat template; run without --chat")
    text = llm.tokenizer.apply_chat_template([{"role": "user", "content": user_message}], tokenize=False,
                                             add_generation_prompt=True)
    return str(text)


def run_generate(request: GenerateRequest, on_delta: Callable[[str], None] | None = None,
                 llm: LLM | None = None) -> GenerateResult:
    llm = llm or LLM(request.engine, device=request.device, dtype=request.dtype)
    prompt = chat_prompt(llm, request.prompt) if request.chat else request.prompt
    params = SamplingParams(max_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p,
                            top_k=request.top_k, seed=request.seed)
    engine = llm.engine
    start = time.perf_counter()
    first_token_at: float | None = None
    engine.add_request("generate", prompt, params)
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if first_token_at is None and out.token_ids:
                first_token_at = time.perf_counter()
            if on_delta is not None and out.delta_text:
                on_delta(out.delta_text)
            if out.finished:
                final = out
    end = time.perf_counter()
    assert final is not None
    return GenerateResult(
        text=final.text, finish_reason=final.finish_reason, num_prompt_tokens=len(final.prompt_token_ids),
        num_output_tokens=len(final.token_ids), ttft_s=(first_token_at or end) - start, total_s=end - start,
    )
