"""The OpenAI endpoints' logic, independent of the web framework: validate a request, turn it
into one Triton generation per (prompt, choice), run them concurrently, and shape the result
as a JSON body or as a stream of SSE events.

Everything that can be refused is refused before the first byte is sent, so those errors get a
proper HTTP status; a streaming request also waits for its first generated chunk before the
response starts (an upstream failure then is still a status code, not an event). Failures after
that end the stream with one `{"error": ...}` event and `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any, Protocol

from serving.openai import responses as R
from serving.openai.errors import (
    OpenAIError,
    invalid_request,
    model_not_found,
    upstream_failed,
    upstream_unavailable,
)
from serving.openai.prompts import DEFAULT_COMPLETION_MAX_TOKENS, PromptProcessor
from serving.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    SamplingRequest,
    build_generation,
)
from serving.openai.sse import SSE_DONE, sse_event
from serving.openai.upstream import GenerationChunk, ModelSignature

FINISH_REASONS = ("stop", "length")


class Upstream(Protocol):
    """What the handler needs from the Triton client (see `serving.openai.upstream`)."""

    async def signature(self) -> ModelSignature: ...

    def generate(self, gen: GenerationRequest, request_id: str) -> AsyncGenerator[GenerationChunk, None]: ...


@dataclass(frozen=True)
class PlannedChoice:
    index: int
    prompt_index: int
    generation: GenerationRequest
    request_id: str


class OpenAIHandler:
    """Serves /v1/completions and /v1/chat/completions for one model over one upstream."""

    def __init__(self, upstream: Upstream, prompts: PromptProcessor, model_name: str,
                 tasks: tuple[str, ...] = ()) -> None:
        self.upstream = upstream
        self.prompts = prompts
        self.model_name = model_name
        self.tasks = tasks
        self.created = int(time.time())

    @property
    def model_ids(self) -> list[str]:
        """The base model and one id per prompt-tuned task ("<model>:<task>")."""
        return [self.model_name] + [f"{self.model_name}:{task}" for task in self.tasks]

    def check_model(self, model: str) -> str | None:
        """404 unless `model` is served; returns the prompt-tuned task it names, if any."""
        if model not in self.model_ids:
            raise model_not_found(model, self.model_ids)
        return model.partition(":")[2] or None

    # -- entry points ----------------------------------------------------------------------
    async def completion(self, req: CompletionRequest) -> dict[str, Any] | AsyncGenerator[str, None]:
        task = self.check_model(req.model)
        req.check_supported()
        if req.logprobs:
            raise invalid_request(
                "logprobs > 0 (top alternatives) is not available from the Triton model; use logprobs=0 "
                "for the sampled tokens' log-probabilities",
                "logprobs",
            )
        logprobs = 0 if req.logprobs is not None else None
        plan = await self._plan(req, req.prompts(), req.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS, logprobs, task)
        meta = R.ResponseMeta(f"cmpl-{uuid.uuid4().hex}", int(time.time()), req.model)
        if req.stream:
            return await self._start_stream(self._completion_events(meta, req, plan))
        states = await self._run_to_end(plan)
        return R.completion_response(meta, states, _prompt_tokens(plan, states), logprobs is not None)

    async def chat(self, req: ChatCompletionRequest) -> dict[str, Any] | AsyncGenerator[str, None]:
        task = self.check_model(req.model)
        req.check_supported()
        if req.top_logprobs:
            raise invalid_request(
                "top_logprobs > 0 is not available from the Triton model; set logprobs=true alone for "
                "the sampled tokens' log-probabilities",
                "top_logprobs",
            )
        prompt = self.prompts.render_chat(req.template_messages())
        logprobs = 0 if req.logprobs else None
        plan = await self._plan(req, [prompt], req.requested_max_tokens(), None, logprobs, task)
        meta = R.ResponseMeta(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), req.model)
        if req.stream:
            return await self._start_stream(self._chat_events(meta, req, plan))
        states = await self._run_to_end(plan)
        return R.chat_response(meta, states, _prompt_tokens(plan, states), logprobs is not None)

    # -- planning ----------------------------------------------------------------------------
    async def _plan(
        self,
        req: SamplingRequest,
        prompts: list[str],
        requested_max: int | None,
        default_max: int | None,
        logprobs: int | None,
        task: str | None = None,
    ) -> list[PlannedChoice]:
        base_id = uuid.uuid4().hex
        plan = []
        for p, prompt in enumerate(prompts):
            max_tokens = self.prompts.fit_max_tokens(self.prompts.count_tokens(prompt), requested_max, default_max)
            for s in range(req.n):
                gen = replace(build_generation(req, prompt, max_tokens, logprobs, sample_index=s), task=task)
                plan.append(PlannedChoice(p * req.n + s, p, gen, f"{base_id}-{p}-{s}"))
        # Checked after the request itself, so a bad request is a 400 even while Triton is down.
        signature = await self.upstream.signature()  # 503 when Triton or the model is unavailable
        if logprobs is not None:
            missing = [n for n in ("output_log_probs", "output_token_ids") if n not in signature.outputs]
            if missing:
                raise invalid_request(f"logprobs are not available: the Triton model lacks {missing}", "logprobs")
        return plan

    # -- running -----------------------------------------------------------------------------
    async def _events(self, plan: list[PlannedChoice]) -> AsyncGenerator[tuple[int, GenerationChunk], None]:
        """(choice index, chunk) as chunks arrive from all generations. Exiting early cancels them."""
        if len(plan) == 1:
            choice = plan[0]
            async with aclosing(self.upstream.generate(choice.generation, choice.request_id)) as chunks:
                async for chunk in chunks:
                    yield choice.index, _checked(chunk)
            return
        queue: asyncio.Queue[tuple[int, GenerationChunk | None, Exception | None]] = asyncio.Queue()

        async def pump(choice: PlannedChoice) -> None:
            try:
                async with aclosing(self.upstream.generate(choice.generation, choice.request_id)) as chunks:
                    async for chunk in chunks:
                        await queue.put((choice.index, chunk, None))
            except Exception as exc:
                await queue.put((choice.index, None, exc))

        tasks = [asyncio.create_task(pump(c)) for c in plan]
        try:
            remaining = len(tasks)
            while remaining:
                index, maybe_chunk, error = await queue.get()
                if error is not None:
                    raise error
                assert maybe_chunk is not None
                chunk = maybe_chunk
                yield index, _checked(chunk)
                if chunk.finish_reason is not None:
                    remaining -= 1
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _absorb(self, state: R.ChoiceState, chunk: GenerationChunk) -> tuple[list[str], list[float]]:
        """Add a chunk to a choice's state; return the chunk's token strings and logprobs."""
        state.text += chunk.text
        tokens = [self.prompts.tokenizer.decode([t]) for t in chunk.token_ids]
        logprobs = list(chunk.token_logprobs)
        state.tokens += tokens
        state.token_logprobs += logprobs
        if chunk.finish_reason is not None:
            state.finish_reason = chunk.finish_reason
            state.num_prompt_tokens = chunk.num_prompt_tokens or 0
            state.num_output_tokens = chunk.num_output_tokens or 0
        return tokens, logprobs

    async def _run_to_end(self, plan: list[PlannedChoice]) -> list[R.ChoiceState]:
        states = {c.index: R.ChoiceState(c.index) for c in plan}
        async with aclosing(self._events(plan)) as events:
            async for index, chunk in events:
                self._absorb(states[index], chunk)
        return [states[c.index] for c in plan]

    async def _start_stream(self, events: AsyncGenerator[str, None]) -> AsyncGenerator[str, None]:
        """Wait for the first event so that failures before any output raise (-> HTTP status)."""
        try:
            first = await events.__anext__()
        except BaseException:
            await events.aclose()
            raise
        return _prepend(first, events)

    # -- streams -----------------------------------------------------------------------------
    async def _completion_events(
        self, meta: R.ResponseMeta, req: CompletionRequest, plan: list[PlannedChoice]
    ) -> AsyncGenerator[str, None]:
        states = {c.index: R.ChoiceState(c.index) for c in plan}
        with_usage = req.include_usage_in_stream
        want_logprobs = req.logprobs is not None
        encoder = R.ChunkEncoder(meta, "text_completion", with_usage)
        sent = False
        async with aclosing(self._events(plan)) as events:
            try:
                async for index, chunk in events:
                    state = states[index]
                    offset = len(state.text)
                    tokens, logprobs = self._absorb(state, chunk)
                    if not chunk.text and chunk.finish_reason is None and not tokens:
                        continue
                    sent = True
                    if want_logprobs:
                        lp = R.completion_logprobs(tokens, logprobs, offset)
                        yield sse_event(R.completion_chunk(meta, index, chunk.text, chunk.finish_reason, lp, with_usage))
                    else:
                        yield encoder.completion(index, chunk.text, chunk.finish_reason)
            except OpenAIError as exc:
                if not sent:
                    raise
                yield sse_event(exc.to_dict())
                yield SSE_DONE
                return
        if with_usage:
            ordered = [states[c.index] for c in plan]
            completion_tokens = sum(s.num_output_tokens for s in ordered)
            yield sse_event(R.completion_usage_chunk(meta, _prompt_tokens(plan, ordered), completion_tokens))
        yield SSE_DONE

    async def _chat_events(
        self, meta: R.ResponseMeta, req: ChatCompletionRequest, plan: list[PlannedChoice]
    ) -> AsyncGenerator[str, None]:
        states = {c.index: R.ChoiceState(c.index) for c in plan}
        started: set[int] = set()
        with_usage = req.include_usage_in_stream
        encoder = R.ChunkEncoder(meta, "chat.completion.chunk", with_usage)
        async with aclosing(self._events(plan)) as events:
            try:
                async for index, chunk in events:
                    state = states[index]
                    tokens, logprobs = self._absorb(state, chunk)
                    if index not in started:
                        started.add(index)
                        role = {"role": "assistant", "content": ""}
                        yield sse_event(R.chat_chunk(meta, index, role, None, None, with_usage))
                    if not chunk.text and chunk.finish_reason is None and not tokens:
                        continue
                    if req.logprobs:
                        delta = {"content": chunk.text} if chunk.text else {}
                        lp = R.chat_logprobs(tokens, logprobs)
                        yield sse_event(R.chat_chunk(meta, index, delta, chunk.finish_reason, lp, with_usage))
                    else:
                        yield encoder.chat(index, chunk.text, chunk.finish_reason)
            except OpenAIError as exc:
                if not started:
                    raise
                yield sse_event(exc.to_dict())
                yield SSE_DONE
                return
        if with_usage:
            ordered = [states[c.index] for c in plan]
            completion_tokens = sum(s.num_output_tokens for s in ordered)
            yield sse_event(R.chat_usage_chunk(meta, _prompt_tokens(plan, ordered), completion_tokens))
        yield SSE_DONE


async def _prepend(first: str, rest: AsyncGenerator[str, None]) -> AsyncGenerator[str, None]:
    async with aclosing(rest):
        yield first
        async for event in rest:
            yield event


def _checked(chunk: GenerationChunk) -> GenerationChunk:
    """Map the engine's non-OpenAI finish reasons to errors ("abort": the server stopped it)."""
    if chunk.finish_reason is None or chunk.finish_reason in FINISH_REASONS:
        return chunk
    if chunk.finish_reason == "abort":
        raise upstream_unavailable("the inference server aborted the request (is it shutting down?)")
    raise upstream_failed(f"generation ended with finish_reason {chunk.finish_reason!r}")


def _prompt_tokens(plan: list[PlannedChoice], states: list[R.ChoiceState]) -> int:
    """Prompt tokens counted once per prompt (its n choices share it), as the engine counted them."""
    by_index = {s.index: s for s in states}
    first_choice_of_prompt: dict[int, int] = {}
    for choice in plan:
        first_choice_of_prompt.setdefault(choice.prompt_index, choice.index)
    return sum(by_index[i].num_prompt_tokens for i in first_choice_of_prompt.values())
