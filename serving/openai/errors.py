"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.

Every failure the gateway reports on purpose is an `OpenAIError`; the app turns it into a JSON
response (or, mid-stream, into one SSE `data:` event carrying the same object). Constructors
below name the common cases so that handlers never pick status codes by hand.
"""

from __future__ import annotations

from typing import Any

from engine.errors import KilnError


class OpenAIError(KilnError):
    """An error the gateway returns to the client as `{"error": {...}}` with `status_code`."""

    def __init__(
        self,
        status_code: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    """400: the request itself is wrong (bad parameter, prompt too long, no chat template)."""
    return OpenAIError(400, message, "invalid_request_error", param, code)


def model_not_found(model: str, available: list[str]) -> OpenAIError:
    """404: `model` is not served here."""
    return OpenAIError(
        404,
        f"The model `{model}` does not exist; this server serves {available}.",
        "invalid_request_error",
        "model",
        "model_not_found",
    )


def unauthorized() -> OpenAIError:
    """401: an API key is configured and the request did not present it as a bearer token."""
    return OpenAIError(
        401,
        "Missing or incorrect API key: send it as 'Authorization: Bearer <key>'.",
        "authentication_error",
        None,
        "invalid_api_key",
    )


def upstream_unavailable(detail: str) -> OpenAIError:
    """503: the Triton server cannot be reached or the model is not ready."""
    return OpenAIError(503, f"The inference server is unavailable: {detail}", "service_unavailable", None, None)


def upstream_failed(detail: str) -> OpenAIError:
    """500: the inference server accepted the request and then failed it."""
    return OpenAIError(500, f"The inference server failed the request: {detail}", "server_error", None, None)
