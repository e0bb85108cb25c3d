"""The gateway's FastAPI app: routes, bearer-token check and OpenAI-shaped error responses.

    GET  /health                 200 when Triton and the model are ready, else 503
    GET  /v1/models              the one served model (+ "backend": what serves it behind Triton)
    POST /v1/completions         text completions (SSE when stream=true)
    POST /v1/chat/completions    chat completions through the tokenizer's chat template

The Triton client is created lazily inside the serving event loop (gRPC asyncio channels
belong to one loop) and closed at shutdown. The routes only translate HTTP to `OpenAIHandler`
calls; a client that disconnects cancels its request (non-streaming too), which cancels the
Triton stream.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.openai import responses as R
from serving.openai.errors import OpenAIError, invalid_request, unauthorized, upstream_unavailable
from serving.openai.handler import OpenAIHandler
from serving.openai.prompts import PromptProcessor
from serving.openai.protocol import ChatCompletionRequest, CompletionRequest, GenerationRequest
from serving.openai.sse import SSE_MEDIA_TYPE
from serving.openai.upstream import GenerationChunk, ModelSignature, TritonUpstream

logger = logging.getLogger("kiln.openai")
T = TypeVar("T")


@dataclass(frozen=True)
class GatewayConfig:
    """What the app serves: `model_name` is both Triton's model and the OpenAI model id."""

    triton_grpc_url: str
    model_name: str
    api_key: str | None = None
    tasks: tuple[str, ...] = ()  # prompt-tuned tasks, served as model ids "<model_name>:<task>"


class _LazyUpstream:
    """Creates the shared `TritonUpstream` on first use, inside the running event loop."""

    def __init__(self, url: str, model_name: str) -> None:
        self.url = url
        self.model_name = model_name
        self._upstream: TritonUpstream | None = None

    def get(self) -> TritonUpstream:
        if self._upstream is None:
            self._upstream = TritonUpstream(self.url, self.model_name)
        return self._upstream

    async def signature(self) -> ModelSignature:
        return await self.get().signature()

    async def backend(self) -> str | None:
        return await self.get().backend()

    def generate(self, gen: GenerationRequest, request_id: str) -> AsyncGenerator[GenerationChunk, None]:
        return self.get().generate(gen, request_id)

    async def is_ready(self) -> bool:
        return await self.get().is_ready()

    async def close(self) -> None:
        if self._upstream is not None:
            await self._upstream.close()
            self._upstream = None


def create_app(config: GatewayConfig, prompts: PromptProcessor) -> FastAPI:
    """Build the gateway app for one Triton model. `prompts` owns the engine's tokenizer."""
    upstream = _LazyUpstream(config.triton_grpc_url, config.model_name)
    handler = OpenAIHandler(upstream, prompts, config.model_name, config.tasks)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await upstream.close()

    app = FastAPI(title="Kiln OpenAI-compatible gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.handler = handler
    app.state.upstream = upstream

    async def check_api_key(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), config.api_key):
            raise unauthorized()

    @app.exception_handler(OpenAIError)
    async def on_openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return JSONResponse(exc.to_dict(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(_validation_error(exc).to_dict(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = OpenAIError(exc.status_code, str(exc.detail), "invalid_request_error", None, None)
        return JSONResponse(error.to_dict(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ClientDisconnected)
    async def on_client_gone(request: Request, exc: ClientDisconnected) -> JSONResponse:
        # Nobody reads this; 499 (nginx's "client closed request") keeps logs truthful.
        return JSONResponse({"error": None}, status_code=499)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error serving %s", request.url.path)
        error = OpenAIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")
        return JSONResponse(error.to_dict(), status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        if not await upstream.is_ready():
            error = upstream_unavailable(f"model {config.model_name!r} at {config.triton_grpc_url} is not ready")
            return JSONResponse(error.to_dict(), status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models", dependencies=[Depends(check_api_key)])
    async def models() -> JSONResponse:
        return JSONResponse(R.models_response(handler.model_ids, handler.created, await upstream.backend()))

    @app.get("/v1/models/{model:path}", dependencies=[Depends(check_api_key)])
    async def model(model: str) -> JSONResponse:
        handler.check_model(model)
        return JSONResponse(R.models_response([model], handler.created, await upstream.backend())["data"][0])

    @app.post("/v1/completions", dependencies=[Depends(check_api_key)])
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return _respond(await _until_disconnect(request, handler.completion(body)))

    @app.post("/v1/chat/completions", dependencies=[Depends(check_api_key)])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return _respond(await _until_disconnect(request, handler.chat(body)))

    return app


def _respond(result: dict[str, Any] | AsyncIterator[str]) -> JSONResponse | StreamingResponse:
    if isinstance(result, dict):
        return JSONResponse(result)
    return StreamingResponse(
        result, media_type=SSE_MEDIA_TYPE, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


class ClientDisconnected(Exception):
    """The client closed the connection before its response was ready."""


async def _until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (so a non-streaming request
    whose client gave up stops generating and frees its KV blocks at once)."""
    task = asyncio.ensure_future(work)
    disconnected = False

    async def watch() -> None:
        nonlocal disconnected
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                disconnected = True
                task.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if disconnected:
            raise ClientDisconnected() from None
        raise
    finally:
        watcher.cancel()


def _validation_error(exc: RequestValidationError) -> OpenAIError:
    """The first pydantic error as a 400 naming the parameter (`messages.0.role`, ...)."""
    errors = exc.errors()
    if not errors:
        return invalid_request("invalid request body")
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return invalid_request(f"request body is not valid JSON: {first.get('msg')}")
    # Drop pydantic's union-member suffixes (`prompt.str`, `stop.list[str]`) from the name.
    loc = [part for part in loc if not any(c in part for c in "[]") and part not in ("str", "int", "list")]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value")
    return invalid_request(f"{param}: {message}" if param else str(message), param)
