"""The gateway's only connection to Triton: one `tritonclient.grpc.aio` client (one HTTP/2
channel) shared by every request, one bidirectional stream per generation.

Contract with the Triton model (`serving/triton/`, TensorRT-LLM tensor names):
- the gateway always sends `stream=true`, `exclude_input_in_output=true` and `temperature`
  (other sampling inputs only when they differ from the default), so each response's
  `text_output` is the text added since the previous response (valid UTF-8);
- the last response of a request carries a non-empty `finish_reason` ("stop", "length", ...)
  and the token counts `num_input_tokens` / `num_output_tokens` (the engine's own counts);
- `output_log_probs`, when `return_log_probs` is set, holds the log-probabilities of the tokens
  that response added, and `output_token_ids` (when the model declares it) their ids;
- an invalid request comes back as an error response on the stream.
The model's metadata is read once (lazily, so the gateway can start before Triton) and only the
inputs the model declares are sent; a non-default parameter the model cannot take is a 400.

Leaving the async iterator returned by `generate` early (client gone, task cancelled) cancels
the gRPC stream; Triton then cancels the request and the engine frees its KV blocks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from serving.openai.errors import OpenAIError, invalid_request, upstream_failed, upstream_unavailable
from serving.openai.protocol import GenerationRequest

REQUIRED_INPUTS = ("text_input", "max_tokens", "stream")
REQUIRED_OUTPUTS = ("text_output", "finish_reason", "num_input_tokens", "num_output_tokens")
# Substrings of Triton's own messages that mean "this model cannot serve now", not "bad request".
_UNAVAILABLE_MARKERS = (
    "unknown model", "is not found", "not ready", "unavailable", "is not loaded", "shutting down",
)


@dataclass(frozen=True)
class TensorSpec:
    datatype: str
    shape: tuple[int, ...]  # as declared by the model, including the batch dim when batched


@dataclass(frozen=True)
class ModelSignature:
    """The inputs and outputs the Triton model declares (from its metadata)."""

    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]


@dataclass(frozen=True)
class GenerationChunk:
    """What one Triton response added to a generation.

    `text` is new text (may be empty), `token_logprobs`/`token_ids` cover the tokens it added
    (empty unless asked for / declared). The last chunk has `finish_reason` and the engine's
    `num_prompt_tokens` / `num_output_tokens` (cumulative); earlier chunks have None there.
    """

    text: str
    token_logprobs: tuple[float, ...] = ()
    token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None
    num_prompt_tokens: int | None = None
    num_output_tokens: int | None = None


def _as_tensor_spec(entry: dict[str, Any]) -> TensorSpec:
    return TensorSpec(str(entry["datatype"]), tuple(int(d) for d in entry.get("shape", [])))


class TritonUpstream:
    """A shared asyncio gRPC client for one Triton model. Create and use inside one event loop."""

    def __init__(self, url: str, model_name: str) -> None:
        import tritonclient.grpc.aio as grpcclient

        self.url = url
        self.model_name = model_name
        self._grpcclient = grpcclient
        self._client = grpcclient.InferenceServerClient(url)
        self._signature: ModelSignature | None = None
        self._signature_lock = asyncio.Lock()
        self._backend: str | None = None

    async def close(self) -> None:
        await self._client.close()

    async def is_ready(self) -> bool:
        """True when Triton answers and the model is loaded and ready."""
        try:
            return bool(await self._client.is_model_ready(self.model_name))
        except Exception:  # connection refused, timeout: not ready
            return False

    async def backend(self) -> str | None:
        """What serves the model (its config's `backend` parameter: kiln | vllm | hf), fetched once;
        None when Triton cannot say (unreachable, or a model that is not Kiln's)."""
        if self._backend is None:
            try:
                config = await self._client.get_model_config(self.model_name, as_json=True)
            except Exception:  # connection refused, unknown model: nothing to report
                return None
            parameters = config.get("config", {}).get("parameters", {})
            self._backend = str(parameters.get("backend", {}).get("string_value", ""))
        return self._backend or None

    async def signature(self) -> ModelSignature:
        """The model's declared tensors, fetched once; 503 if Triton or the model is unavailable."""
        if self._signature is not None:
            return self._signature
        async with self._signature_lock:
            if self._signature is None:
                try:
                    meta = await self._client.get_model_metadata(self.model_name, as_json=True)
                except InferenceServerException as exc:
                    raise upstream_unavailable(
                        f"cannot read model {self.model_name!r} from Triton at {self.url}: {exc.message()}"
                    ) from None
                signature = ModelSignature(
                    inputs={e["name"]: _as_tensor_spec(e) for e in meta.get("inputs", [])},
                    outputs={e["name"]: _as_tensor_spec(e) for e in meta.get("outputs", [])},
                )
                missing = [n for n in REQUIRED_INPUTS if n not in signature.inputs]
                missing += [n for n in REQUIRED_OUTPUTS if n not in signature.outputs]
                if missing:
                    raise upstream_failed(
                        f"Triton model {self.model_name!r} lacks tensor(s) {missing} that the gateway needs"
                    )
                self._signature = signature
        assert self._signature is not None
        return self._signature

    def _inputs(self, sig: ModelSignature, gen: GenerationRequest) -> list[Any]:
        """Build the request tensors, sending only those the model declares."""
        values: dict[str, list[Any]] = {
            "text_input": [gen.prompt.encode("utf-8")],
            "max_tokens": [gen.max_tokens],
            "stream": [True],
            "exclude_input_in_output": [True],
            "temperature": [gen.temperature],
        }
        # (input name, value, default, OpenAI parameter): sent only when not the default (an
        # absent input means the default to the model, and fewer tensors cost less on both
        # sides); refused when the model lacks the input and the client asked for another value.
        optional: list[tuple[str, Any, Any, str]] = [
            ("top_p", gen.top_p, 1.0, "top_p"),
            ("top_k", gen.top_k, 0, "top_k"),
            ("presence_penalty", gen.presence_penalty, 0.0, "presence_penalty"),
            ("frequency_penalty", gen.frequency_penalty, 0.0, "frequency_penalty"),
            ("repetition_penalty", gen.repetition_penalty, 1.0, "repetition_penalty"),
            ("min_tokens", gen.min_tokens, 0, "min_tokens"),
            ("ignore_eos", gen.ignore_eos, False, "ignore_eos"),
            ("return_log_probs", gen.logprobs is not None, False, "logprobs"),
        ]
        if gen.seed is not None:
            seed_name = "seed" if "seed" in sig.inputs else "random_seed"
            optional.append((seed_name, gen.seed, None, "seed"))
        for name, value, default, param in optional:
            if value == default:
                continue
            if name in sig.inputs:
                values[name] = [value]
            else:
                raise invalid_request(f"{param} is not supported by the served model {self.model_name!r}", param)
        if gen.task is not None:
            if "task_name" not in sig.inputs:
                raise invalid_request(f"the served model {self.model_name!r} has no prompt-tuned tasks", "model")
            values["task_name"] = [gen.task.encode("utf-8")]
        if gen.stop:
            if "stop_words" not in sig.inputs:
                raise invalid_request(f"stop is not supported by the served model {self.model_name!r}", "stop")
            values["stop_words"] = [s.encode("utf-8") for s in gen.stop]

        tensors = []
        for name, vals in values.items():
            spec = sig.inputs.get(name)
            if spec is None:
                continue
            if spec.datatype == "BYTES":
                array = np.array(vals, dtype=np.object_)
            else:
                array = np.array(vals, dtype=triton_to_np_dtype(spec.datatype))
            # Leading dims (batch, ...) are 1; the last dim holds the values.
            array = array.reshape([1] * (max(len(spec.shape), 1) - 1) + [len(vals)])
            tensor = self._grpcclient.InferInput(name, list(array.shape), spec.datatype)
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        return tensors

    def _outputs(self, sig: ModelSignature, gen: GenerationRequest) -> list[Any]:
        names = list(REQUIRED_OUTPUTS)
        if gen.logprobs is not None:
            names += [n for n in ("output_log_probs", "output_token_ids") if n in sig.outputs]
        return [self._grpcclient.InferRequestedOutput(n) for n in names]

    async def generate(self, gen: GenerationRequest, request_id: str) -> AsyncGenerator[GenerationChunk, None]:
        """Stream one generation. Raises OpenAIError: 503 when Triton is unreachable, 400 when the
        model refuses the request, 500 when it fails. Closing the iterator cancels the request."""
        sig = await self.signature()
        request = {
            "model_name": self.model_name,
            "inputs": self._inputs(sig, gen),
            "outputs": self._outputs(sig, gen),
            "request_id": request_id,
        }

        async def one_request() -> AsyncIterator[dict[str, Any]]:
            yield request

        stream = self._client.stream_infer(one_request())
        produced = False
        try:
            while True:
                try:
                    result, error = await stream.__anext__()
                except StopAsyncIteration:
                    raise upstream_failed("the stream ended before the final response") from None
                except grpc.aio.AioRpcError as exc:
                    raise _rpc_error(exc, self.url) from None
                if error is not None:
                    raise _model_error(error.message(), produced)
                chunk = _parse_chunk(result, gen.logprobs is not None)
                produced = True
                yield chunk
                if chunk.finish_reason is not None:
                    return
        finally:
            # No-op when the call already ended; otherwise tells Triton to cancel the request.
            stream.cancel()


def _first_bytes(raw: bytes) -> bytes:
    """The first element of a serialized BYTES tensor (4-byte little-endian length, then data)."""
    if len(raw) < 4:
        return b""
    length = int.from_bytes(raw[:4], "little")
    return raw[4:4 + length]


def _parse_chunk(result: Any, with_logprobs: bool) -> GenerationChunk:
    """Read one response's tensors straight from the protobuf (Triton's gRPC responses carry
    them in `raw_output_contents`); this runs once per streamed token, so it avoids building
    numpy arrays for the scalar outputs."""
    response = result.get_response()
    raw = response.raw_output_contents
    if len(raw) != len(response.outputs):
        raise upstream_failed("a Triton response without raw output contents")
    tensors = {out.name: raw[i] for i, out in enumerate(response.outputs)}
    text = _first_bytes(tensors.get("text_output", b"")).decode("utf-8", errors="replace")
    reason = _first_bytes(tensors.get("finish_reason", b"")).decode("utf-8", errors="replace")
    logprobs: tuple[float, ...] = ()
    token_ids: tuple[int, ...] = ()
    if with_logprobs:
        logprobs = tuple(np.frombuffer(tensors.get("output_log_probs", b""), dtype="<f4").tolist())
        token_ids = tuple(np.frombuffer(tensors.get("output_token_ids", b""), dtype="<i4").tolist())
    if not reason:
        return GenerationChunk(text, logprobs, token_ids)
    num_in, num_out = tensors.get("num_input_tokens"), tensors.get("num_output_tokens")
    return GenerationChunk(
        text,
        logprobs,
        token_ids,
        finish_reason=reason,
        num_prompt_tokens=None if not num_in else int.from_bytes(num_in[:4], "little", signed=True),
        num_output_tokens=None if not num_out else int.from_bytes(num_out[:4], "little", signed=True),
    )


def _rpc_error(exc: grpc.aio.AioRpcError, url: str) -> OpenAIError:
    code = exc.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return upstream_unavailable(f"Triton at {url}: {exc.details()}")
    return upstream_failed(f"{code.name}: {exc.details()}")


def _model_error(message: str, produced: bool) -> OpenAIError:
    """An error response from Triton: model missing/unready -> 503; a refusal before any output
    (the model validates requests first) -> 400; a failure after output -> 500."""
    if any(marker in message.lower() for marker in _UNAVAILABLE_MARKERS):
        return upstream_unavailable(message)
    if not produced:
        return invalid_request(message)
    return upstream_failed(message)
