"""A minimal HTTP/2 client for many long-lived gRPC streams on one connection.

bench/control_fleet.py holds thousands of agents' Session streams. Through
grpc.aio each report a simulated agent writes costs ~100 µs of the client's CPU
(a batch, a completion, a wake-up of the event loop), so one client core could
not even send 10,000 reports a second. This client speaks the same gRPC over
HTTP/2 on the wire — the controller cannot tell the difference — but builds the
frames itself: a report is one pre-built DATA frame, and the reports due in a
tick go out in one write per connection.

It does only what holding client-streaming calls needs: the connection preface,
SETTINGS (acknowledged; the peer's initial window honoured), PING acknowledged
(the controller's keepalive closes connections that do not answer), flow
control on what it sends (a report that does not fit the windows is skipped and
counted), and a stream's end (RST_STREAM, END_STREAM or the connection's loss).
It never decodes the peer's headers (no HPACK decoder): a stream is open once
its first DATA frame arrives, and it has ended when the peer ends it. Unary
calls (Register) go through grpc.aio, which reports their status codes.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import cast

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
SETTINGS_ENABLE_PUSH, SETTINGS_INITIAL_WINDOW_SIZE = 0x2, 0x4
OWN_WINDOW = 1 << 24
"""What the peer may send us per stream and on the connection: far more than
the few bytes a Session's commands take, so no WINDOW_UPDATE is ever needed."""


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes((kind, flags))
        + struct.pack(">I", stream_id)
        + payload
    )


def grpc_message(message: bytes) -> bytes:
    """gRPC's length-prefixed message: not compressed, 4-byte length."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def _literal(value: bytes) -> bytes:
    assert len(value) < 127  # a one-byte HPACK length, no Huffman coding
    return bytes((len(value),)) + value


def request_headers(authority: str, path: str) -> bytes:
    """The HPACK block of a gRPC request, from the static table and literals
    without indexing (so no dynamic table state on either side)."""
    return (
        b"\x83"  # :method POST (static 3)
        + b"\x86"  # :scheme http (static 6)
        + b"\x04" + _literal(path.encode())  # :path (static name 4)
        + b"\x01" + _literal(authority.encode())  # :authority (static name 1)
        + b"\x0f\x10" + _literal(b"application/grpc")  # content-type (static name 31)
        + b"\x00" + _literal(b"te") + _literal(b"trailers")
    )  # fmt: skip


class Stream:
    """One client-streaming call on a Connection."""

    def __init__(self, stream_id: int, window: int, on_end: Callable[[Stream, str], None]):
        self.id = stream_id
        self.window = window
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        """Done when the peer's first message arrives."""
        self._on_end = on_end
        self.ended = False

    def end(self, why: str) -> None:
        if self.ended:
            return
        self.ended = True
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(why))
        self._on_end(self, why)


class Connection(asyncio.Protocol):
    """One HTTP/2 connection carrying many gRPC streams."""

    def __init__(self, authority: str):
        self.authority = authority
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Stream] = {}
        self._next_id = 1
        self._buffer = bytearray()
        self._peer_initial_window = 65_535
        self.send_window = 65_535
        """The connection's send window (bytes of DATA we may still send)."""
        self.closed = False
        self.blocked = 0
        """Frames not sent because a flow-control window was exhausted."""

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: cls(f"{host}:{port}"), host, port)
        return conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)
        settings = struct.pack(">HIHI", SETTINGS_ENABLE_PUSH, 0,
                               SETTINGS_INITIAL_WINDOW_SIZE, OWN_WINDOW)  # fmt: skip
        self.transport.write(
            PREFACE
            + frame(SETTINGS, 0, 0, settings)
            + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", OWN_WINDOW - 65_535))
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for stream in list(self.streams.values()):
            stream.end(f"connection lost: {exc or 'closed'}")
        self.streams.clear()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def start(
        self, path: str, first_message: bytes, on_end: Callable[[Stream, str], None]
    ) -> Stream:
        """Open a stream and send its first message (a Session's hello)."""
        assert self.transport is not None and not self.closed
        stream = Stream(self._next_id, self._peer_initial_window, on_end)
        self._next_id += 2
        self.streams[stream.id] = stream
        body = grpc_message(first_message)
        self.transport.write(
            frame(HEADERS, END_HEADERS, stream.id, request_headers(self.authority, path))
            + frame(DATA, 0, stream.id, body)
        )
        self.send_window -= len(body)
        stream.window -= len(body)
        return stream

    def data_frame(self, stream: Stream, body: bytes) -> bytes:
        """The DATA frame for `body` on `stream`, charged to the windows; b"" when
        it does not fit them (counted in `blocked`)."""
        if len(body) > min(self.send_window, stream.window):
            self.blocked += 1
            return b""
        self.send_window -= len(body)
        stream.window -= len(body)
        return frame(DATA, 0, stream.id, body)

    def write(self, data: bytes) -> None:
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= 9:
            length = int.from_bytes(self._buffer[:3], "big")
            if len(self._buffer) < 9 + length:
                break
            kind, flags = self._buffer[3], self._buffer[4]
            stream_id = int.from_bytes(self._buffer[5:9], "big") & 0x7FFF_FFFF
            payload = bytes(self._buffer[9 : 9 + length])
            del self._buffer[: 9 + length]
            self._frame(kind, flags, stream_id, payload)

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        assert self.transport is not None
        if kind == SETTINGS and not flags & ACK:
            for i in range(0, len(payload) - 5, 6):
                key, value = struct.unpack(">HI", payload[i : i + 6])
                if key == SETTINGS_INITIAL_WINDOW_SIZE:
                    for each in self.streams.values():
                        each.window += value - self._peer_initial_window
                    self._peer_initial_window = value
            self.transport.write(frame(SETTINGS, ACK, 0))
        elif kind == PING and not flags & ACK:
            self.transport.write(frame(PING, ACK, 0, payload))
        elif kind == WINDOW_UPDATE:
            increment = int.from_bytes(payload[:4], "big") & 0x7FFF_FFFF
            if stream_id == 0:
                self.send_window += increment
            elif (updated := self.streams.get(stream_id)) is not None:
                updated.window += increment
        elif kind == GOAWAY:
            self.close()
        elif (stream := self.streams.get(stream_id)) is not None:
            if kind == DATA and not stream.opened.done():
                stream.opened.set_result(None)
            if kind == RST_STREAM:
                code = int.from_bytes(payload[:4], "big")
                self._end(stream, f"RST_STREAM {code}")
            elif kind in (DATA, HEADERS) and flags & END_STREAM:
                self._end(stream, "ended by the controller")

    def _end(self, stream: Stream, why: str) -> None:
        self.streams.pop(stream.id, None)
        stream.end(why)
