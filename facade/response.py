"""One request's response: the only place that knows whether it has begun.

Before the first byte an error is an HTTP error (its status, an OpenAI error
body, Retry-After); after it, the same error is an SSE `data:` error event
followed by `data: [DONE]` (in a Responses stream, an `event: error` and no
[DONE], as that API ends its streams), and the request counts with the error's status,
never as 200. It also notes, for the metrics, the status a request ended with
and when its first token left.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from facade.asgi import Send
from facade.errors import ApiError
from kscope.v1 import inference_pb2
from kscope_common.request_stats import CANCELLED

JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
DONE = b"data: [DONE]\n\n"
LAST_WORDS_TIMEOUT_S = 1.0
"""How long an error event may take to reach a client that stopped reading."""

ERRORS: dict[int, int] = {}
"""Error answers sent, by HTTP status (for /metrics)."""


async def send_error(
    send: Send, error: ApiError, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    """An HTTP error response (nothing else was sent on this request)."""
    ERRORS[error.status] = ERRORS.get(error.status, 0) + 1
    headers = [*JSON_HEADERS, *(extra or ()), *error.headers]
    if error.retry_after_s is not None:
        headers.append((b"retry-after", str(error.retry_after_s).encode()))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": error.body()})


class ResponseWriter:
    """Writes one request's response through ASGI `send`."""

    __slots__ = (
        "_send", "finished", "first_token_at", "headers", "start", "started", "status", "usage",
        "whole_events",
    )  # fmt: skip

    def __init__(self, send: Send):
        self._send = send
        self.headers: list[tuple[bytes, bytes]] = []
        """Sent with the response, whatever it is (the x-ratelimit-* headers)."""
        self.usage: inference_pb2.Usage | None = None
        """The engine's token counts, when it sent them."""
        self.start = time.monotonic()
        self.status = CANCELLED
        """What the request ended with; until a response starts, one its client left."""
        self.first_token_at = 0.0
        self.started = False
        """Bytes went out: errors are now SSE events."""
        self.finished = False
        self.whole_events = False
        """A stream of whole SSE events (the Responses API): written as they
        are, ended as the engine ended it (no [DONE] of ours), an error as an
        `event: error`."""

    async def json(self, body: bytes, content_type: str = "") -> None:
        """A one-piece answer: JSON, unless the engine labelled it otherwise
        (`content_type`: an audio transcription as text, srt or vtt)."""
        self.status = 200
        self.started = True
        if content_type:
            headers = [(b"content-type", content_type.encode("latin-1")), *self.headers]
        else:
            headers = [*JSON_HEADERS, *self.headers] if self.headers else JSON_HEADERS
        await self._send({"type": "http.response.start", "status": 200, "headers": headers})
        await self._send({"type": "http.response.body", "body": body})
        self.finished = True

    async def begin_stream(self) -> None:
        if not self.started:
            self.started = True
            self.status = 200
            headers = [*SSE_HEADERS, *self.headers] if self.headers else SSE_HEADERS
            await self._send({"type": "http.response.start", "status": 200, "headers": headers})

    async def events(self, chunks: list[bytes] | Any) -> None:
        """SSE events, one per chunk, in one write: `data:` events of the
        chunks, or (whole_events) the engine's events as they are."""
        if not self.started:
            await self.begin_stream()
        if not self.first_token_at:
            self.first_token_at = time.monotonic()
        if self.whole_events:
            payload = b"".join([e + b"\n\n" for e in chunks])
        else:
            payload = b"".join([b"data: " + c + b"\n\n" for c in chunks])
        await self._send({"type": "http.response.body", "body": payload, "more_body": True})

    async def comment(self, text: str) -> None:
        """An SSE comment line: clients ignore it, proxies see the connection live."""
        if not self.started:
            await self.begin_stream()
        line = ": " + text.replace("\r", " ").replace("\n", " ") + "\n\n"
        await self._send({"type": "http.response.body", "more_body": True, "body": line.encode()})

    async def done(self) -> None:
        if not self.started:
            await self.begin_stream()
        await self._send({"type": "http.response.body", "body": b"" if self.whole_events else DONE})
        self.finished = True

    async def fail(self, error: ApiError) -> None:
        """The error, as an HTTP error or (once begun) an SSE error event + [DONE]."""
        if self.finished:
            return
        self.finished = True
        if not self.started:
            self.status = error.status
            await send_error(self._send, error, self.headers)
            return
        self.status = error.status  # what the request ended with, though HTTP said 200
        ERRORS[error.status] = ERRORS.get(error.status, 0) + 1
        if self.whole_events:
            event = b'event: error\ndata: {"type":"error","error":%s}\n\n' % error.error_object()
        else:
            event = b"data: " + error.body() + b"\n\n" + DONE
        # A client that stopped reading must not hold the request open.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                self._send({"type": "http.response.body", "body": event}), LAST_WORDS_TIMEOUT_S
            )

    def client_left(self) -> None:
        """Nobody to answer: the request counts as cancelled."""
        self.status = CANCELLED
        self.finished = True
