"""The request bodies the gateway accepts, as pydantic models, and their one translation into
the frozen `GenerationRequest` that crosses into the Triton client.

OpenAI's field names and ranges are checked by pydantic (a failure becomes HTTP 400 naming the
field); the sampling values are then validated once more by the engine's own `SamplingParams`
so that the gateway never forwards a request the engine would refuse. Fields OpenAI defines but
this server cannot honour (`suffix`, `echo`, `logit_bias`, `tools`, ...) are refused with a 400
rather than silently ignored; unknown extra fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from serving.openai.errors import invalid_request

MAX_N = 16
MAX_STOP_STRINGS = 16


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions (plus vLLM's extensions)."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extensions, used by benchmark harnesses.
    ignore_eos: bool = False
    top_k: int | None = Field(None, ge=-1)
    min_tokens: int = Field(0, ge=0)
    repetition_penalty: float | None = Field(None, gt=0.0)

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise invalid_request(f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", "stop")
        if any(not s for s in stops):
            raise invalid_request("stop: stop strings must be non-empty", "stop")
        return tuple(stops)

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def check_supported(self) -> None:
        """Refuse fields that would change the answer but that this server does not implement."""
        if self.logit_bias:
            raise invalid_request("logit_bias is not supported by this server", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise invalid_request("stream_options is only allowed when stream is true", "stream_options")


class CompletionRequest(SamplingRequest):
    """POST /v1/completions. `prompt` is a string or a list of strings (one choice set each)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def prompts(self) -> list[str]:
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and all(isinstance(p, str) for p in self.prompt):
            return [str(p) for p in self.prompt]
        if not self.prompt:
            raise invalid_request("prompt must not be empty", "prompt")
        raise invalid_request(
            "prompt as token ids is not supported: the Triton model takes text; send the prompt as a string",
            "prompt",
        )

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise invalid_request("suffix is not supported by this server", "suffix")
        if self.echo:
            raise invalid_request("echo is not supported by this server", "echo")
        if self.best_of is not None and self.best_of != self.n:
            raise invalid_request("best_of other than n is not supported by this server", "best_of")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self, index: int) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise invalid_request(
                    f"messages[{index}].content: only text parts are supported, got type {part.type!r}",
                    f"messages.{index}.content",
                )
            texts.append(part.text)
        return "".join(texts)


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None

    def template_messages(self) -> list[dict[str, str]]:
        """Messages as the plain dicts `apply_chat_template` expects."""
        out = []
        for i, msg in enumerate(self.messages):
            entry = {"role": msg.role, "content": msg.text(i)}
            if msg.name:
                entry["name"] = msg.name
            out.append(entry)
        return out

    def requested_max_tokens(self) -> int | None:
        if self.max_completion_tokens is not None and self.max_tokens is not None:
            if self.max_completion_tokens != self.max_tokens:
                raise invalid_request(
                    "max_tokens and max_completion_tokens disagree; send only max_completion_tokens",
                    "max_completion_tokens",
                )
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise invalid_request("tools are not supported by this server", "tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise invalid_request("response_format other than text is not supported", "response_format")
        if self.top_logprobs and not self.logprobs:
            raise invalid_request("top_logprobs requires logprobs to be true", "top_logprobs")


@dataclass(frozen=True)
class GenerationRequest:
    """One generation sent to Triton: a text prompt and the values of its sampling tensors.

    Already validated: `SamplingParams` accepted these values. `logprobs` is None when the
    client did not ask for log-probabilities, else the number of top alternatives wanted.
    """

    prompt: str
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    min_tokens: int
    ignore_eos: bool
    logprobs: int | None
    task: str | None = None  # a prompt-tuned task of the engine (OpenAI model id "base:task")


def build_generation(
    req: SamplingRequest, prompt: str, max_tokens: int, logprobs: int | None, sample_index: int = 0
) -> GenerationRequest:
    """Translate a validated OpenAI request into one generation (choice `sample_index` of `n`).

    Choice i of a seeded request uses seed + i, so the n choices differ yet each is reproducible
    and choice 0 equals the same request with n=1. Raises a 400 OpenAIError on values the
    engine refuses.
    """
    seed = None if req.seed is None else (req.seed + sample_index) % 2**63
    top_k = 0 if req.top_k is None or req.top_k < 0 else req.top_k
    values = dict(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=top_k,
        seed=seed,
        stop=req.stop_strings(),
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        min_tokens=req.min_tokens,
        ignore_eos=req.ignore_eos,
    )
    try:
        SamplingParams(logprobs=logprobs, **values)  # type: ignore[arg-type]
    except InvalidRequestError as exc:
        param = str(exc).split(" ", 1)[0]
        raise invalid_request(str(exc), param if param in values else None) from None
    return GenerationRequest(prompt=prompt, logprobs=logprobs, **values)  # type: ignore[arg-type]
