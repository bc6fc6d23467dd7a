"""A small HTTP/1.1 client for the agent's hop to its engine.

The agent forwards every request and every chunk, so its HTTP client is on the
token path; a general-purpose client (aiohttp, httpx) spends several times
more CPU per request than this: pre-built request bytes, keep-alive
connections, httptools' C parser, and body pieces handed over in batches as
they arrive. Only what talking to an OpenAI-compatible server needs is here:
POST with a body (JSON, or a multipart upload), any response framing
httptools parses (Content-Length, chunked, close-delimited), over plain TCP or
TLS (the event loop's own TLS transport: the handshake once per keep-alive
connection, then the same protocol callbacks, so an https upstream streams the
way an http one does).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable
from typing import cast

import httptools

CONNECT_TIMEOUT_S = 5.0
READ_AHEAD_BYTES = 64 * 1024
"""Body bytes read from the engine and not yet taken: past this, the socket is
not read until the consumer catches up, so a request whose client stopped
reading stops its engine instead of growing. It is also the most one read
hands on at once, so it bounds the batch a stalled request holds in flight
below the agent (with 256 KiB, sixteen stalled streams on one call each left
the agent 10-41 MiB larger; with 64 KiB, 0-10 MiB)."""
RECEIVE_BUFFER_BYTES = 256 * 1024
"""The engine socket's kernel receive buffer: capped (no autotuned megabytes
held for a stalled request), but larger than READ_AHEAD_BYTES so a distant
https upstream is not held to 64 KiB per round trip."""


class HttpError(Exception):
    """The connection failed, timed out, or the response could not be parsed."""


class CertificateError(HttpError):
    """The server's TLS certificate could not be verified (unknown CA, wrong host
    name, expired): permanent until the trust settings or the certificate change."""

    def __init__(self, message: str, why: str):
        super().__init__(message)
        self.why = why
        """OpenSSL's reason, e.g. "self-signed certificate in certificate chain"."""


class Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self) -> None:
        self._pieces: list[bytes] = []
        # httptools looks callbacks up once; a bound append costs no Python frame.
        self.on_body: Callable[[bytes], None] = self._pieces.append
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._deadline = 0.0
        """When the current wait times out (loop time)."""
        self._timeout_s = 0.0
        self._timer: asyncio.TimerHandle | None = None
        """One timer per connection, moved only when it fires early (_check_deadline)."""
        self._unread = 0
        self._paused = False
        self.failure: HttpError | None = None
        self.reused = False
        """It carried a request before (the server may have closed it since)."""
        self._requests = 0
        self._reset()

    def _reset(self) -> None:
        self._unread = 0
        self.status = 0
        self.content_type = b""
        self.headers_done = False
        self.complete = False
        self.keep_alive = True
        self.received_any = False
        self._pieces.clear()

    # asyncio.Protocol -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        self._unread += len(data)
        if self._unread > READ_AHEAD_BYTES and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.failure = HttpError("unexpected protocol upgrade")
            self.close()
        except httptools.HttpParserError as exc:
            self.failure = HttpError(f"bad HTTP response: {exc}")
            self.close()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.complete and self.failure is None:
            self.failure = HttpError(f"connection lost: {exc or 'closed by the server'}")
        self._transport = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wake()

    # httptools callbacks ----------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) == 12 and name.lower() == b"content-type":
            self.content_type = value

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self.headers_done = True

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self._parser.should_keep_alive()

    # ------------------------------------------------------------------------------------------
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self, timeout_s: float) -> None:
        """Wait for more of the response, at most `timeout_s`. A timer per wait
        would cost 2 µs (uvloop's call_later + cancel) on every chunk of a
        paced stream; the connection's one timer fires at the earliest deadline
        it was set for and, finding a later one, moves there."""
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        self._deadline = deadline = loop.time() + timeout_s
        self._timeout_s = timeout_s
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_at(deadline, self._check_deadline)
        try:
            await waiter
        finally:
            self._waiter = None

    def _check_deadline(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # nothing waits: the next wait sets a timer again
        loop = asyncio.get_running_loop()
        if loop.time() < self._deadline:
            self._timer = loop.call_at(self._deadline, self._check_deadline)
            return
        self.failure = HttpError(f"no answer from the engine for {self._timeout_s:.0f}s")
        self.close()
        waiter.set_result(None)

    @property
    def open(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def send(self, request: bytes) -> None:
        if self._transport is None:
            raise HttpError("connection is closed")
        self._reset()
        self.reused = self._requests > 0
        self._requests += 1
        self._transport.write(request)

    async def headers(self, timeout_s: float) -> None:
        """Wait for the status line and headers."""
        while not self.headers_done:
            if self.failure is not None:
                raise self.failure
            await self._wait(timeout_s)

    async def read(self, timeout_s: float) -> bytes | None:
        """The body bytes that arrived since the last read, or None at the end."""
        while not self._pieces:
            if self.complete:
                return None
            if self.failure is not None:
                raise self.failure
            await self._wait(timeout_s)
        data = self._pieces[0] if len(self._pieces) == 1 else b"".join(self._pieces)
        self._pieces.clear()
        self._unread = 0
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        return data

    async def read_all(self, timeout_s: float) -> bytes:
        parts = []
        while (data := await self.read(timeout_s)) is not None:
            parts.append(data)
        return b"".join(parts)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class Http1Pool:
    """Keep-alive connections to one host:port, over TLS when given a context
    (the host name is then the one its certificate must name)."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None = None):
        self._host = host
        self._port = port
        self._tls = tls
        self._idle: list[Connection] = []

    async def acquire(self) -> Connection:
        while self._idle:
            conn = self._idle.pop()
            if conn.open:
                return conn
        loop = asyncio.get_running_loop()
        if self._tls is None:
            connecting = loop.create_connection(Connection, self._host, self._port)
        else:
            connecting = loop.create_connection(
                Connection, self._host, self._port, ssl=self._tls, server_hostname=self._host,
                ssl_handshake_timeout=CONNECT_TIMEOUT_S,
            )  # fmt: skip
        try:
            _, conn = await asyncio.wait_for(connecting, CONNECT_TIMEOUT_S)
        except ssl.SSLCertVerificationError as exc:
            why = str(exc.verify_message or exc.reason or exc)
            raise CertificateError(
                f"the TLS certificate of {self._host}:{self._port} could not be verified: {why}",
                why,
            ) from exc
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            raise HttpError(f"cannot connect to {self._host}:{self._port}: {exc}") from exc
        return conn

    def release(self, conn: Connection) -> None:
        """Keep a connection whose response was read to the end; close any other
        (closing is how the engine learns that a request was abandoned)."""
        if conn.complete and conn.keep_alive and conn.open and conn.failure is None:
            self._idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()
