"""OpenAI-shaped error bodies, and the translation of gRPC failures into them."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import orjson

from kscope.v1 import inference_pb2
from kscope_common.errors import http_for_grpc


@dataclass  # not frozen: Starlette's handlers clear a raised error's __traceback__
class ApiError(Exception):
    """An error the client sees: HTTP status plus an OpenAI error object."""

    __hash__ = Exception.__hash__  # by identity, as exceptions are (eq compares values)

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    retry_after_s: int | None = None
    raw_error: bytes = b""
    """An engine's own OpenAI error object (JSON), passed through as it is."""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    """More response headers (a 429's x-ratelimit-*)."""

    def error_object(self) -> bytes:
        if self.raw_error:
            return self.raw_error
        return orjson.dumps(
            {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        )

    def body(self) -> bytes:
        return b'{"error":' + self.error_object() + b"}"


class AgentFailure(Exception):
    """The agent or its engine failed the request."""

    def __init__(self, error: ApiError, code: grpc.StatusCode, engine_error: bool):
        super().__init__(error.message)
        self.error = error
        self.code = code
        self.engine_error = engine_error

    @property
    def transport(self) -> bool:
        """The agent could not be reached (so another instance may do)."""
        return self.code is grpc.StatusCode.UNAVAILABLE and not self.engine_error


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def failure(error: inference_pb2.RequestError, model: str) -> AgentFailure:
    """The one translation of a failed request, whichever transport told it."""
    code = _CODES.get(error.grpc_code, grpc.StatusCode.UNKNOWN)
    if error.http_status:
        # The engine's own answer passes through as it is.
        api = ApiError(error.http_status, error.message, raw_error=error.error_body)
        return AgentFailure(api, code, engine_error=True)
    return AgentFailure(_agent_error(code, error.message, model), code, engine_error=False)


def _agent_error(code: grpc.StatusCode, message: str, model: str) -> ApiError:
    if code is grpc.StatusCode.UNAVAILABLE:
        return ApiError(
            503,
            f"the instance serving {model!r} is unavailable: {message}",
            "service_unavailable_error",
            code="instance_unavailable",
            retry_after_s=1,
        )
    status, error_type = http_for_grpc(code)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return ApiError(status, f"request to {model!r} timed out", error_type, code="timeout")
    return ApiError(status, message or code.name, error_type)


def request_error(code: grpc.StatusCode, message: str) -> inference_pb2.RequestError:
    """A RequestError for a failure no agent described (the call itself broke)."""
    return inference_pb2.RequestError(grpc_code=code.value[0], message=message)
