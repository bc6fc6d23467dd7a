"""OpenAI-shaped error bodies, and the translation of gRPC failures into them."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import orjson

from kscope_common.errors import http_for_grpc


@dataclass(frozen=True)
class ApiError(Exception):
    """An error the client sees: HTTP status plus an OpenAI error object."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    retry_after_s: int | None = None
    raw_error: bytes = b""
    """An engine's own OpenAI error object (JSON), passed through as it is."""

    def error_object(self) -> bytes:
        if self.raw_error:
            return self.raw_error
        return orjson.dumps(
            {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        )

    def body(self) -> bytes:
        return b'{"error":' + self.error_object() + b"}"


def from_rpc_error(exc: grpc.aio.AioRpcError, model: str) -> ApiError:
    """The client-facing error for a failed agent call."""
    trailing = exc.trailing_metadata() or ()
    meta: dict[str, str | bytes] = {str(item[0]): item[1] for item in trailing}  # type: ignore[index]
    status_text = meta.get("kscope-http-status")
    raw = meta.get("kscope-error-bin", b"")
    if status_text is not None:
        status = int(status_text) if str(status_text).isdigit() else 502
        return ApiError(
            status,
            exc.details() or "engine error",
            raw_error=raw if isinstance(raw, bytes) else b"",
        )
    status, error_type = http_for_grpc(exc.code())
    if exc.code() is grpc.StatusCode.UNAVAILABLE:
        return ApiError(
            503,
            f"the instance serving {model!r} is unavailable: {exc.details()}",
            "service_unavailable_error",
            code="instance_unavailable",
            retry_after_s=1,
        )
    if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
        return ApiError(504, f"request to {model!r} timed out", error_type, code="timeout")
    return ApiError(status, exc.details() or exc.code().name, error_type)
