"""Triton backends speaking TensorRT-LLM's tensor names: gRPC bidirectional streaming
(`tritonclient.grpc.aio`) and HTTP `generate_stream` (SSE, `httpx`).

Inputs sent: `text_input`, `max_tokens`, `stream=true`, and — only where the model declares
them (read from its metadata at start) — `temperature`, `exclude_input_in_output=true`, and
for `--ignore-eos` the first of `ignore_eos` (Kiln), `min_tokens` or `min_length`
(TensorRT-LLM) set to the expected output length. When streaming, each response's
`text_output` is the new text (a delta), as in TensorRT-LLM. A model output that reports the
number of generated tokens (`num_output_tokens`), when declared, is used as the server's
count; otherwise output tokens are counted by re-tokenizing the streamed text.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from benchmarks.backends.base import Backend, BackendOptions, error_text, register_backend
from benchmarks.datasets import SampleRequest
from benchmarks.errors import BenchmarkError
from benchmarks.metrics import RequestRecord

IGNORE_EOS_INPUTS = ("ignore_eos", "min_tokens", "min_length")
TOKEN_COUNT_OUTPUTS = ("num_output_tokens",)

_NUMPY_DTYPES = {
    "BOOL": np.bool_,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}


def serving_backend(model_config: dict[str, Any]) -> str | None:
    """The `backend` parameter of a Kiln model's Triton config (kiln | vllm | hf), else None."""
    value = model_config.get("parameters", {}).get("backend", {}).get("string_value")
    return str(value) if value else None


class ModelSignature:
    """The inputs and outputs a Triton model declares, and the request values Kiln sends it."""

    def __init__(self, model: str, metadata: dict[str, Any], options: BackendOptions) -> None:
        self.model = model
        self.inputs = {t["name"]: t for t in metadata.get("inputs", [])}
        self.outputs = {t["name"]: t for t in metadata.get("outputs", [])}
        for required in ("text_input", "max_tokens"):
            if required not in self.inputs:
                raise BenchmarkError(
                    f"model {model!r} has no input {required!r}; the triton backends need a model with "
                    f"TensorRT-LLM's tensor names (it declares {sorted(self.inputs)})"
                )
        if "text_output" not in self.outputs:
            raise BenchmarkError(f"model {model!r} has no output 'text_output' (it declares {sorted(self.outputs)})")
        self.count_output = next((n for n in TOKEN_COUNT_OUTPUTS if n in self.outputs), None)
        self.ignore_eos_input = next((n for n in IGNORE_EOS_INPUTS if n in self.inputs), None)
        if options.ignore_eos and self.ignore_eos_input is None:
            raise BenchmarkError(
                f"--ignore-eos: model {model!r} has none of the inputs {list(IGNORE_EOS_INPUTS)}; drop --ignore-eos"
            )

    def request_values(self, request: SampleRequest, options: BackendOptions) -> dict[str, Any]:
        """Input name -> scalar value for one request (only inputs the model declares)."""
        values: dict[str, Any] = {
            "text_input": request.prompt,
            "max_tokens": request.expected_output_len,
        }
        if "stream" in self.inputs:
            values["stream"] = True
        if "temperature" in self.inputs:
            values["temperature"] = options.temperature
        if "exclude_input_in_output" in self.inputs:
            values["exclude_input_in_output"] = True
        if options.ignore_eos and self.ignore_eos_input is not None:
            name = self.ignore_eos_input
            values[name] = True if name == "ignore_eos" else request.expected_output_len
        return values

    def shape(self, name: str) -> list[int]:
        """The request shape of a scalar input: every dim of its metadata shape set to 1."""
        dims = self.inputs[name].get("shape") or [1]
        return [1 if int(d) < 0 else int(d) for d in dims]


@register_backend("triton-grpc")
class TritonGrpcBackend(Backend):
    """One bidirectional `ModelStreamInfer` stream per request over a shared gRPC channel.

    The request iterator ends after its single request, so the server closes the stream once
    the request's final response is sent; a response flagged `triton_final_response` ends
    it too.
    """

    def __init__(self, options: BackendOptions) -> None:
        super().__init__(options)
        self.client: Any = None
        self.signature: ModelSignature | None = None

    async def start(self) -> None:
        from tritonclient.grpc import aio as grpcclient
        from tritonclient.utils import InferenceServerException

        url = self.options.url.removeprefix("grpc://")
        self.client = grpcclient.InferenceServerClient(url=url)
        try:
            metadata = await self.client.get_model_metadata(self.options.model, as_json=True)
        except InferenceServerException as exc:
            await self.close()
            raise BenchmarkError(f"--url {url}: cannot read model {self.options.model!r} ({exc.message()})") from None
        self.signature = ModelSignature(self.options.model, metadata, self.options)
        try:
            config = await self.client.get_model_config(self.options.model, as_json=True)
        except InferenceServerException:
            config = {}
        self.serving_backend = serving_backend(config.get("config", {}))

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None

    def _inputs(self, request: SampleRequest) -> list[Any]:
        from tritonclient.grpc import InferInput

        assert self.signature is not None, "start() first"
        inputs = []
        for name, value in self.signature.request_values(request, self.options).items():
            meta = self.signature.inputs[name]
            shape = self.signature.shape(name)
            data = value.encode("utf-8") if isinstance(value, str) else value
            tensor = InferInput(name, shape, meta["datatype"])
            tensor.set_data_from_numpy(np.full(shape, data, dtype=_NUMPY_DTYPES[meta["datatype"]]))
            inputs.append(tensor)
        return inputs

    async def send(self, request: SampleRequest, record: RequestRecord) -> None:
        from tritonclient.grpc import InferRequestedOutput

        assert self.signature is not None and self.client is not None, "start() first"
        inputs = self._inputs(request)
        names = ["text_output"] + ([self.signature.count_output] if self.signature.count_output else [])
        outputs = [InferRequestedOutput(n) for n in names]

        async def one_request() -> Any:
            yield {"model_name": self.options.model, "inputs": inputs, "outputs": outputs,
                   "request_id": str(record.index)}

        stream = self.client.stream_infer(one_request(), stream_timeout=self.options.request_timeout_s)
        finished = False
        try:
            async for result, error in stream:
                if error is not None:
                    record.error = error_text(error)
                    break
                response = result.get_response()
                text = result.as_numpy("text_output")
                if text is not None:
                    record.on_output(b"".join(np.ravel(text)).decode("utf-8", errors="replace"), self.now())
                if self.signature.count_output:
                    counts = result.as_numpy(self.signature.count_output)
                    if counts is not None and counts.size:
                        record.server_output_tokens = int(np.ravel(counts)[-1])
                final = response.parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    break
            finished = True
        except Exception as exc:  # a broken stream is a failed request, not a crash
            record.error = error_text(exc)
        finally:
            if not finished:
                stream.cancel()
        if not record.error:
            if record.ttft is None:
                record.error = "the stream ended without any text_output"
            else:
                record.success = True


@register_backend("triton-http")
class TritonHttpBackend(Backend):
    """`POST /v2/models/<model>/generate_stream`, parsing the server-sent events."""

    def __init__(self, options: BackendOptions) -> None:
        super().__init__(options)
        self.client: Any = None
        self.signature: ModelSignature | None = None
        self.base_url = options.url.rstrip("/")
        if "://" not in self.base_url:
            self.base_url = "http://" + self.base_url

    async def start(self) -> None:
        import httpx

        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.options.request_timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        )
        url = f"{self.base_url}/v2/models/{self.options.model}"
        try:
            response = await self.client.get(url)
        except httpx.HTTPError as exc:
            await self.close()
            raise BenchmarkError(f"--url {self.base_url}: cannot reach the server ({error_text(exc)})") from None
        if response.status_code != 200:
            await self.close()
            raise BenchmarkError(f"--url {self.base_url}: GET {url} -> HTTP {response.status_code} {response.text[:200]}")
        self.signature = ModelSignature(self.options.model, response.json(), self.options)
        try:
            config = await self.client.get(f"{url}/config")
            self.serving_backend = serving_backend(config.json()) if config.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            self.serving_backend = None

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    async def send(self, request: SampleRequest, record: RequestRecord) -> None:
        assert self.signature is not None and self.client is not None, "start() first"
        payload = self.signature.request_values(request, self.options)
        url = f"{self.base_url}/v2/models/{self.options.model}/generate_stream"
        try:
            async with self.client.stream("POST", url, json=payload) as response:
                if response.status_code != 200:
                    body = (await response.aread()).decode("utf-8", errors="replace")
                    record.error = f"HTTP {response.status_code}: {body[:300]}"
                    return
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    event = json.loads(line[len("data:"):])
                    if "error" in event:
                        record.error = f"server error: {event['error']}"
                        return
                    if "text_output" in event:
                        record.on_output(str(event["text_output"]), self.now())
                    if self.signature.count_output and self.signature.count_output in event:
                        record.server_output_tokens = int(np.ravel(event[self.signature.count_output])[-1])
        except Exception as exc:  # a broken connection is a failed request, not a crash
            record.error = error_text(exc)
            return
        if record.ttft is None:
            record.error = "the event stream ended without any text_output"
        else:
            record.success = True
