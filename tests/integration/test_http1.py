"""The agent's HTTP/1.1 client against real sockets: keep-alive reuse, a server
that closed an idle connection, chunked streams, timeouts, refused connections."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from node_agent.engines.http1 import Connection, Http1Pool, HttpError

REQUEST = b"POST /v1/x HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}"


class Server:
    """A scripted HTTP server on 127.0.0.1:0; `respond` decides per request."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests = 0
        self.close_after_response = False
        self.chunks: list[bytes] = [b"hello"]
        self.delay_s = 0.0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                self.requests += 1
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                             b"Content-Type: text/event-stream\r\n\r\n")  # fmt: skip
                for chunk in self.chunks:
                    await asyncio.sleep(self.delay_s)
                    writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
                await writer.drain()
                if self.close_after_response:
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


@pytest.fixture
async def server() -> AsyncIterator[tuple[Server, int]]:
    script = Server()
    srv = await asyncio.start_server(script.handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    yield script, port
    srv.close()


async def _fetch(pool: Http1Pool) -> bytes:
    conn = await pool.acquire()
    conn.send(REQUEST)
    await conn.headers(5)
    body = await conn.read_all(5)
    pool.release(conn)
    return body


async def test_keep_alive_reuses_one_connection(server: tuple[Server, int]) -> None:
    script, port = server
    pool = Http1Pool("127.0.0.1", port)
    for _ in range(5):
        assert await _fetch(pool) == b"hello"
    assert script.connections == 1 and script.requests == 5
    pool.close()


async def test_stream_pieces_arrive_as_sent(server: tuple[Server, int]) -> None:
    script, port = server
    script.chunks = [b"a", b"b", b"c"]
    script.delay_s = 0.05
    pool = Http1Pool("127.0.0.1", port)
    conn = await pool.acquire()
    conn.send(REQUEST)
    await conn.headers(5)
    assert conn.status == 200 and conn.content_type == b"text/event-stream"
    pieces = []
    while (data := await conn.read(5)) is not None:
        pieces.append(data)
    assert pieces == [b"a", b"b", b"c"]  # one read per chunk: nothing waited for company
    pool.release(conn)
    pool.close()


async def test_server_closed_idle_connection_is_noticed(server: tuple[Server, int]) -> None:
    script, port = server
    script.close_after_response = True
    pool = Http1Pool("127.0.0.1", port)
    assert await _fetch(pool) == b"hello"
    await asyncio.sleep(0.05)  # the server's close arrives
    assert await _fetch(pool) == b"hello"
    assert script.connections == 2
    pool.close()


async def _answering(
    server: tuple[Server, int], chunks: list[bytes], delay_s: float, timeout_s: float = 5.0
) -> tuple[Http1Pool, Connection]:
    """A pool, and one of its connections whose response (`chunks`, each after
    `delay_s`) has begun: its headers are read."""
    script, port = server
    script.chunks = chunks
    script.delay_s = delay_s
    pool = Http1Pool("127.0.0.1", port)
    conn = await pool.acquire()
    conn.send(REQUEST)
    await conn.headers(timeout_s)
    return pool, conn


async def test_abandoned_response_closes_the_connection(server: tuple[Server, int]) -> None:
    script, _ = server
    pool, conn = await _answering(server, [b"a"] * 50, 0.02)
    await conn.read(5)
    pool.release(conn)  # not read to the end: must not be reused
    assert not conn.open
    assert await _fetch(pool) == b"a" * 50
    assert script.connections == 2
    pool.close()


async def test_the_read_timeout_is_per_wait_not_per_response(server: tuple[Server, int]) -> None:
    # Five pieces 0.1 s apart: each wait is well within 0.3 s, the whole is not.
    pool, conn = await _answering(server, [b"p"] * 5, 0.1, timeout_s=0.3)
    assert await conn.read_all(0.3) == b"p" * 5
    pool.release(conn)
    pool.close()


async def test_read_timeout_and_refused_connection(server: tuple[Server, int]) -> None:
    pool, conn = await _answering(server, [b"slow"], 1.0)
    with pytest.raises(HttpError, match="no answer"):
        await conn.read(0.1)
    pool.close()
    sock_pool = Http1Pool("127.0.0.1", 1)  # nothing listens on port 1
    with pytest.raises(HttpError, match="cannot connect"):
        await sock_pool.acquire()
