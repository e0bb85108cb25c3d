"""Turn engine outputs into Triton responses (the tensors of `request.OUTPUTS`).

Shapes include the batch dimension of 1 (the model is batched): `text_output` `[1, 1]`,
`output_log_probs` `[1, 1, n]` (batch, beam, tokens), `cum_log_probs` `[1, 1]`,
`output_token_ids` `[1, n]`, `finish_reason` / `num_*_tokens` `[1, 1]`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.outputs import RequestOutput
from serving.triton.request import GenerateRequest


@dataclass
class Stream:
    """One in-flight Triton request, owned by the model's responder thread once registered.

    `sender` is the request's response sender (decoupled model) or None (the final response is
    put in `response` and `response_ready` is set for execute() to return it). `token_ids` accumulates the
    generated ids; `num_sent_tokens` of them went out in earlier responses.
    """

    request_id: str
    request: GenerateRequest
    triton_request: Any
    num_prompt_tokens: int
    sender: Any | None = None
    token_ids: list[int] = field(default_factory=list)
    num_sent_tokens: int = 0
    last_token_time: float | None = None
    closed: bool = False
    aborting: bool = False  # abort sent to the engine, final response queued
    response: Any | None = None
    response_ready: threading.Event | None = None
    created: float = field(default_factory=time.monotonic)


def _bytes_tensor(pb_utils: Any, name: str, value: str) -> Any:
    return pb_utils.Tensor(name, np.array([[value.encode("utf-8")]], dtype=np.object_))


def build_response(pb_utils: Any, stream: Stream, output: RequestOutput) -> Any:
    """The response for `output`: text added since the last response when streaming, the whole
    text (with the prompt unless `exclude_input_in_output`) when not; finish reason and token
    counts when the request finished; log-probabilities of the tokens covered when asked."""
    request = stream.request
    if request.stream:
        text = output.delta_text
    else:
        text = output.text if request.exclude_input_in_output else request.prompt + output.text
        if not output.finished:
            raise ValueError("a non-streaming request is answered only when it has finished")
    tensors = [_bytes_tensor(pb_utils, "text_output", text)]
    start = stream.num_sent_tokens if request.stream else 0
    if request.return_log_probs:
        logprobs = output.logprobs or []
        new_ids = stream.token_ids[start:]
        new_logprobs = np.array(logprobs[start:start + len(new_ids)], dtype=np.float32)
        tensors += [
            pb_utils.Tensor("output_log_probs", new_logprobs.reshape(1, 1, -1)),
            pb_utils.Tensor("cum_log_probs", np.array([[output.cumulative_logprob or 0.0]], dtype=np.float32)),
            pb_utils.Tensor("output_token_ids", np.array([new_ids], dtype=np.int32).reshape(1, -1)),
        ]
    if output.finished:
        tensors += [
            _bytes_tensor(pb_utils, "finish_reason", output.finish_reason or "stop"),
            pb_utils.Tensor("num_input_tokens", np.array([[stream.num_prompt_tokens]], dtype=np.int32)),
            pb_utils.Tensor("num_output_tokens", np.array([[len(stream.token_ids)]], dtype=np.int32)),
        ]
    stream.num_sent_tokens = len(stream.token_ids)
    return pb_utils.InferenceResponse(output_tensors=tensors)


def error_response(pb_utils: Any, message: str, code: str = "INVALID_ARG") -> Any:
    """An error response; `code` names a `pb_utils.TritonError` code (INVALID_ARG -> HTTP 400)."""
    error_cls = pb_utils.TritonError
    return pb_utils.InferenceResponse(error=error_cls(message, getattr(error_cls, code, error_cls.INTERNAL)))
