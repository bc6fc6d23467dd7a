"""The floor under any gateway written in Python: the thinnest HTTP relay.

Not part of KScope. It answers GET /v1/models itself (so `bench/run.py` sees a
ready model) and relays every other request to the upstream, and the
upstream's response bytes to the client, as they arrive: uvloop, httptools to
find where messages end, raw protocols, one upstream keep-alive connection per
client connection. No ASGI, no framing, no parsing of events, no TLS, no
accounting. With `--hops 2` it starts a second relay between itself and the
upstream (its child, so `bench/run.py` counts its CPU too): the shape of
facade → agent → engine, with nothing done on either hop.

    python bench/run.py --only e,f --no-plaintext \\
        --gateway-cmd 'python bench/relay.py --hops 2 --upstream {upstream_url} --port {port}'

What this costs per paced chunk is what no two-process Python path can go below.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from typing import cast
from urllib.parse import urlsplit

import httptools
import orjson
import uvloop
from run import free_port

READY_TIMEOUT_S = 10.0
MODELS_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"


class UpstreamSide(asyncio.Protocol):
    """One keep-alive connection to the upstream, relaying to one client."""

    def __init__(self, client: asyncio.Transport):
        self._client = client
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self._client.write(data)
        self._parser.feed_data(data)

    def on_message_complete(self) -> None:
        self._parser = httptools.HttpResponseParser(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._client.close()


class ClientSide(asyncio.Protocol):
    """One client connection: requests in, relayed or answered."""

    def __init__(self, upstream: tuple[str, int], models: bytes):
        self._upstream_address = upstream
        self._models = models
        self._parser = httptools.HttpRequestParser(self)
        self._raw: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self._upstream: UpstreamSide | None = None
        self._connecting: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._raw.append(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self.connection_lost(None)

    def on_message_complete(self) -> None:
        raw, self._raw = b"".join(self._raw), []
        assert self._transport is not None
        if self._parser.get_method() == b"GET":
            self._transport.write(MODELS_HEAD % len(self._models) + self._models)
        elif self._upstream is not None and self._upstream.transport is not None:
            self._upstream.transport.write(raw)
        else:
            self._connecting = asyncio.ensure_future(self._connect_and_send(raw))

    async def _connect_and_send(self, raw: bytes) -> None:
        assert self._transport is not None
        client = self._transport
        host, port = self._upstream_address
        loop = asyncio.get_running_loop()
        _, upstream = await loop.create_connection(lambda: UpstreamSide(client), host, port)
        self._upstream = upstream
        assert upstream.transport is not None
        upstream.transport.write(raw)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._upstream is not None and self._upstream.transport is not None:
            self._upstream.transport.close()
        if self._transport is not None:
            self._transport.close()


def wait_listening(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise SystemExit(f"the next relay did not listen on {port} within {timeout_s:g} s")


async def serve(port: int, upstream: tuple[str, int], model: str) -> None:
    models = orjson.dumps(
        {"object": "list", "data": [{"id": model, "object": "model", "state": "ready"}]}
    )
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: ClientSide(upstream, models), "127.0.0.1", port, backlog=4096
    )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--upstream", required=True, help="the upstream's base URL, e.g. http://h:p/v1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", default="bench")
    p.add_argument("--hops", type=int, default=1, help="relays in a row (this one included)")
    a = p.parse_args()
    url = urlsplit(a.upstream)
    upstream = (url.hostname or "127.0.0.1", url.port or 80)
    child: subprocess.Popen[bytes] | None = None
    if a.hops > 1:
        # The next hop, nearer the upstream; this relay sends to it.
        next_port = free_port()
        argv = [sys.executable, os.path.abspath(__file__), "--upstream", a.upstream,
                "--port", str(next_port), "--model", a.model,
                "--hops", str(a.hops - 1)]  # fmt: skip
        child = subprocess.Popen(argv)
        wait_listening(next_port, READY_TIMEOUT_S)
        upstream = ("127.0.0.1", next_port)
    try:
        uvloop.run(serve(a.port, upstream, a.model))
    finally:
        if child is not None:
            child.terminate()
            child.wait(READY_TIMEOUT_S)


if __name__ == "__main__":
    main()
