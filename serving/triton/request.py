"""The Triton model's wire contract: tensor names of TensorRT-LLM's Triton backend, and the
translation of one request's tensors into a prompt and `SamplingParams`.

Every tensor is declared once in `INPUTS` / `OUTPUTS`; the repository writer renders them into
config.pbtxt, so the config and the parser cannot disagree. The model batches requests
(`max_batch_size > 0`), so each tensor arrives with a leading batch dimension of 1:
`text_input` as `[1, 1]`, `stop_words` as `[1, n]`.

Semantics (TensorRT-LLM's where it defines them):
- no sampling input at all means greedy decoding (as in TensorRT-LLM); `temperature > 0`,
  `top_k > 1` or `0 < top_p < 1` sample (temperature defaults to 1.0 then). `top_p = 0` and
  `top_k = 0` disable those filters.
- `end_id` replaces the model's end-of-sequence tokens; `end_id < 0` (or `ignore_eos`) never
  stops on them. `pad_id` and `length_penalty` are accepted and have no effect (no padding and
  no beam search in Kiln); `beam_width` and `num_return_sequences` must be 1.
- empty strings in `stop_words` / `bad_words` are ignored (TensorRT-LLM's curl examples send
  `"stop_words": ""`).
- `text_output`: with `stream=true` each response carries the text added since the previous
  one; with `stream=false` the single response carries the whole generation, preceded by the
  prompt unless `exclude_input_in_output=true` (TensorRT-LLM's behaviour).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams

DEFAULT_MAX_TOKENS = 16
T = TypeVar("T", int, float)


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor as config.pbtxt declares it (dims exclude the batch dim)."""

    name: str
    data_type: str  # Triton config type, e.g. "TYPE_INT32"
    dims: tuple[int, ...] = (1,)
    optional: bool = True


INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("text_input", "TYPE_STRING", optional=False),
    TensorSpec("max_tokens", "TYPE_INT32"),
    TensorSpec("stream", "TYPE_BOOL"),
    TensorSpec("exclude_input_in_output", "TYPE_BOOL"),
    TensorSpec("temperature", "TYPE_FP32"),
    TensorSpec("top_k", "TYPE_INT32"),
    TensorSpec("top_p", "TYPE_FP32"),
    TensorSpec("seed", "TYPE_UINT64"),
    TensorSpec("random_seed", "TYPE_UINT64"),
    TensorSpec("stop_words", "TYPE_STRING", (-1,)),
    TensorSpec("bad_words", "TYPE_STRING", (-1,)),
    TensorSpec("end_id", "TYPE_INT32"),
    TensorSpec("pad_id", "TYPE_INT32"),
    TensorSpec("ignore_eos", "TYPE_BOOL"),
    TensorSpec("min_tokens", "TYPE_INT32"),
    TensorSpec("repetition_penalty", "TYPE_FP32"),
    TensorSpec("presence_penalty", "TYPE_FP32"),
    TensorSpec("frequency_penalty", "TYPE_FP32"),
    TensorSpec("length_penalty", "TYPE_FP32"),
    TensorSpec("beam_width", "TYPE_INT32"),
    TensorSpec("num_return_sequences", "TYPE_INT32"),
    TensorSpec("return_log_probs", "TYPE_BOOL"),
    TensorSpec("task_name", "TYPE_STRING"),
)

# Outputs: text on every response; the last response of a request also carries
# `finish_reason` ("stop" | "length" | "abort") and the token counts.
OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("text_output", "TYPE_STRING", (-1,)),
    TensorSpec("finish_reason", "TYPE_STRING"),
    TensorSpec("num_input_tokens", "TYPE_INT32"),
    TensorSpec("num_output_tokens", "TYPE_INT32"),
    TensorSpec("cum_log_probs", "TYPE_FP32", (-1,)),
    TensorSpec("output_log_probs", "TYPE_FP32", (-1, -1)),
    TensorSpec("output_token_ids", "TYPE_INT32", (-1,)),
)

_INPUT_TYPES = {spec.name: spec.data_type for spec in INPUTS}
# numpy kinds each Triton type may arrive as ("O"/"S" for BYTES).
_KINDS = {
    "TYPE_STRING": ("O", "S"),
    "TYPE_BOOL": ("b",),
    "TYPE_INT32": ("i", "u"),
    "TYPE_UINT64": ("u", "i"),
    "TYPE_FP32": ("f",),
}


@dataclass(frozen=True)
class GenerateRequest:
    """One parsed request: what to generate and how to answer."""

    prompt: str
    params: SamplingParams
    stream: bool = False
    exclude_input_in_output: bool = False
    return_log_probs: bool = False
    task: str | None = None  # a prompt-tuned task of the engine (input `task_name`)


def _array(inputs: Mapping[str, np.ndarray], name: str) -> np.ndarray | None:
    """The request's tensor `name` without its batch dim, type-checked; None when absent."""
    array = inputs.get(name)
    if array is None:
        return None
    triton_type = _INPUT_TYPES[name]
    if array.dtype.kind not in _KINDS[triton_type]:
        raise InvalidRequestError(
            f"input {name!r} must be {triton_type.removeprefix('TYPE_').replace('STRING', 'BYTES')}, "
            f"got {array.dtype}"
        )
    if array.ndim >= 2:
        if array.shape[0] != 1:
            raise InvalidRequestError(
                f"input {name!r} has batch size {array.shape[0]}; send one prompt per request "
                "(Kiln batches concurrent requests in flight)"
            )
        array = array[0]
    return array.reshape(-1)


def _scalar(inputs: Mapping[str, np.ndarray], name: str) -> object | None:
    array = _array(inputs, name)
    if array is None:
        return None
    if array.size != 1:
        raise InvalidRequestError(f"input {name!r} must hold one value, got {array.size}")
    return array[0].item() if isinstance(array[0], np.generic) else array[0]


def _decode(value: object, name: str) -> str:
    if isinstance(value, str):
        return value
    if not isinstance(value, bytes | bytearray):
        raise InvalidRequestError(f"input {name!r} must be BYTES (UTF-8 text), got {type(value).__name__}")
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(
            f"input {name!r} is not valid UTF-8: byte 0x{value[exc.start]:02x} at position {exc.start}"
        ) from None


def _words(inputs: Mapping[str, np.ndarray], name: str) -> tuple[str, ...]:
    array = _array(inputs, name)
    if array is None:
        return ()
    return tuple(word for word in (_decode(v, name) for v in array) if word)


def _int(inputs: Mapping[str, np.ndarray], name: str) -> int | None:
    value = _scalar(inputs, name)
    return None if value is None else int(value)  # type: ignore[call-overload]


def _float(inputs: Mapping[str, np.ndarray], name: str) -> float | None:
    value = _scalar(inputs, name)
    if value is None:
        return None
    result = float(value)  # type: ignore[arg-type]
    if not np.isfinite(result):
        raise InvalidRequestError(f"input {name!r} must be a finite number, got {result}")
    return result


def _bool(inputs: Mapping[str, np.ndarray], name: str, default: bool = False) -> bool:
    value = _scalar(inputs, name)
    return default if value is None else bool(value)


def _default(value: T | None, default: T) -> T:
    return default if value is None else value


def parse_request(
    inputs: Mapping[str, np.ndarray], vocab_size: int, default_max_tokens: int = DEFAULT_MAX_TOKENS
) -> GenerateRequest:
    """Translate one request's tensors (name -> numpy array, batch dim included) into a
    GenerateRequest. Raises InvalidRequestError naming the offending input."""
    unknown = sorted(set(inputs) - set(_INPUT_TYPES))
    if unknown:
        raise InvalidRequestError(f"unknown input(s) {unknown}; known inputs: {sorted(_INPUT_TYPES)}")
    prompt_value = _scalar(inputs, "text_input")
    if prompt_value is None:
        raise InvalidRequestError("input 'text_input' is required (the prompt, BYTES)")
    prompt = _decode(prompt_value, "text_input")
    if not prompt:
        raise InvalidRequestError("input 'text_input' is empty; send a non-empty prompt")

    for name in ("beam_width", "num_return_sequences"):
        value = _int(inputs, name)
        if value is not None and value != 1:
            raise InvalidRequestError(f"input {name!r} must be 1 (Kiln has no beam search), got {value}")

    max_tokens = _int(inputs, "max_tokens")
    if max_tokens is None:
        max_tokens = default_max_tokens
    if max_tokens <= 0:
        raise InvalidRequestError(f"input 'max_tokens' must be >= 1, got {max_tokens}")

    temperature = _float(inputs, "temperature")
    top_k = _int(inputs, "top_k")
    top_p = _float(inputs, "top_p")
    if top_p is not None and top_p == 0.0:
        top_p = 1.0  # TensorRT-LLM: 0 disables top-p
    sampling_asked = (
        (temperature is not None and temperature > 0)
        or (top_k is not None and top_k > 1)
        or (top_p is not None and 0.0 < top_p < 1.0)
    )
    if temperature is None:
        temperature = 1.0 if sampling_asked else 0.0

    seed = _int(inputs, "seed")
    random_seed = _int(inputs, "random_seed")
    if seed is not None and random_seed is not None and seed != random_seed:
        raise InvalidRequestError(f"inputs 'seed' ({seed}) and 'random_seed' ({random_seed}) disagree; send one")
    seed = seed if seed is not None else random_seed

    ignore_eos = _bool(inputs, "ignore_eos")
    stop_token_ids: tuple[int, ...] = ()
    end_id = _int(inputs, "end_id")
    if end_id is not None:
        if end_id >= vocab_size:
            raise InvalidRequestError(f"input 'end_id' ({end_id}) is not a token id (vocabulary size {vocab_size})")
        ignore_eos = True  # end_id replaces the model's EOS tokens
        if end_id >= 0:
            stop_token_ids = (end_id,)

    return_log_probs = _bool(inputs, "return_log_probs")
    params = SamplingParams(
        max_tokens=max_tokens,
        min_tokens=_default(_int(inputs, "min_tokens"), 0),
        temperature=temperature,
        top_k=_default(top_k, 0),
        top_p=_default(top_p, 1.0),
        repetition_penalty=_default(_float(inputs, "repetition_penalty"), 1.0),
        presence_penalty=_default(_float(inputs, "presence_penalty"), 0.0),
        frequency_penalty=_default(_float(inputs, "frequency_penalty"), 0.0),
        seed=seed,
        stop=_words(inputs, "stop_words"),
        bad_words=_words(inputs, "bad_words"),
        stop_token_ids=stop_token_ids,
        ignore_eos=ignore_eos,
        logprobs=0 if return_log_probs else None,
    )
    return GenerateRequest(
        prompt=prompt,
        params=params,
        stream=_bool(inputs, "stream"),
        exclude_input_in_output=_bool(inputs, "exclude_input_in_output"),
        return_log_probs=return_log_probs,
        task=_task(inputs),
    )


def _task(inputs: Mapping[str, np.ndarray]) -> str | None:
    value = _scalar(inputs, "task_name")
    if value is None:
        return None
    task = _decode(value, "task_name")
    return task or None


def check_length(num_prompt_tokens: int, max_tokens: int, max_seq_len: int) -> None:
    """Refuse a request that cannot fit the engine's context: the prompt plus `max_tokens`
    must not exceed `max_seq_len`."""
    if num_prompt_tokens >= max_seq_len:
        raise InvalidRequestError(
            f"prompt is {num_prompt_tokens} tokens; this engine's max_seq_len is {max_seq_len} "
            f"(prompt + max_tokens must fit), so send at most {max_seq_len - 1} prompt tokens"
        )
    if num_prompt_tokens + max_tokens > max_seq_len:
        raise InvalidRequestError(
            f"max_tokens ({max_tokens}) + prompt ({num_prompt_tokens} tokens) exceeds this engine's "
            f"max_seq_len ({max_seq_len}); send max_tokens <= {max_seq_len - num_prompt_tokens}"
        )
