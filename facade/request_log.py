"""Which request a response answers, and one access-log line per request.

Every /v1 response carries `X-Request-Id`: the client's own when it sent a
usable one (so its logs and ours match), otherwise one made here. The agent
passes the same id to the engine (vLLM logs it).

The access log is off by default (`access_log`); on, each request ends with
one JSON line on the `kscope.access` logger, written as it is (no prefix) to
standard error or `access_log_path`: when, the id, method, path, model, the
key's id and owner (never the secret), status, duration, time to first token
and the engine's token counts.
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from pathlib import Path

import orjson

from facade.asgi import Message, Scope, Send
from kscope.v1 import inference_pb2

REQUEST_ID_SCOPE_KEY = "kscope.request_id"
MAX_CLIENT_ID = 128
_ALLOWED = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:/+=@")

log = logging.getLogger("kscope.access")


def request_id(scope: Scope) -> bytes:
    """The client's X-Request-Id when it is a short token of safe characters, else a new one;
    kept in the scope so every part of the facade uses the same."""
    known: bytes | None = scope.get(REQUEST_ID_SCOPE_KEY)
    if known is not None:
        return known
    chosen = b""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            if 0 < len(value) <= MAX_CLIENT_ID and _ALLOWED.issuperset(value):
                chosen = value
            break
    if not chosen:
        chosen = f"req-{uuid.uuid4().hex}".encode()
    scope[REQUEST_ID_SCOPE_KEY] = chosen
    return chosen


def with_request_id(send: Send, rid: bytes) -> Send:
    """`send` that adds X-Request-Id to the response's headers (off the token path)."""

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", rid)]}
        await send(message)

    return sending


def configure(enabled: bool, path: Path | None) -> None:
    """Send the access log to stderr or `path` as bare JSON lines, or nowhere."""
    log.propagate = False
    for old in list(log.handlers):
        log.removeHandler(old)
        old.close()
    if not enabled:
        log.disabled = True
        return
    log.disabled = False
    log.setLevel(logging.INFO)
    handler: logging.Handler
    handler = logging.FileHandler(path) if path else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)


def access(
    scope: Scope,
    *,
    model: str,
    key_id: str,
    owner: str,
    status: int,
    duration_s: float,
    ttft_s: float,
    usage: inference_pb2.Usage | None,
) -> None:
    """One line for one request, when the access log is on."""
    if log.disabled or not log.handlers:
        return
    line = {
        "time": round(time.time(), 3),
        "request_id": request_id(scope).decode(),
        "method": scope["method"],
        "path": scope["path"],
        "model": model,
        "key_id": key_id,
        "owner": owner,
        "status": status,
        "duration_ms": round(duration_s * 1000, 2),
        "ttft_ms": round(ttft_s * 1000, 2) if ttft_s else None,
        "prompt_tokens": usage.prompt_tokens if usage is not None else None,
        "completion_tokens": usage.completion_tokens if usage is not None else None,
    }
    log.info(orjson.dumps(line).decode())
