"""A lean HTTP/1.1 load client: asyncio protocol + httptools' C response parser.

The client shares a core with the upstream in the direct measurement, so every
microsecond it spends is taken from the thing it measures. It therefore sends
pre-built request bytes over keep-alive connections and, for SSE, only counts
`data:` events in the raw body bytes and timestamps each read; it never parses
JSON on the hot path. (Measured against an aiohttp client on the same machine,
see README.md.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

import httptools
import orjson

REQUEST_TIMEOUT_S = 30.0
ERROR_BACKOFF_S = 0.05
_DATA = b"data:"
_DONE = b"data: [DONE]"


class TransportError(Exception):
    """The connection failed or the response could not be parsed."""


@dataclass(frozen=True)
class Endpoint:
    """Where requests go: host, port and a path prefix taken from a base URL."""

    host: str
    port: int
    prefix: str

    @classmethod
    def from_url(cls, base_url: str) -> Endpoint:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"only http:// URLs are supported: {base_url!r}")
        return cls(parts.hostname, parts.port or 80, parts.path.rstrip("/"))

    def request(self, method: str, path: str, body: bytes = b"", api_key: str = "") -> bytes:
        """Build the complete request bytes once; they are sent as they are."""
        lines = [
            f"{method} {self.prefix}{path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            "Accept: */*",
        ]
        if body:
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        if api_key:
            lines.append(f"Authorization: Bearer {api_key}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class Reply:
    """One response as the client saw it. Times are `time.perf_counter()` seconds."""

    status: int
    started: float
    finished: float
    first_event: float | None
    """Arrival of the read holding the first SSE `data:` event (streams only)."""
    events: int
    """SSE `data:` events, not counting `data: [DONE]`."""
    body: bytes
    """Kept when asked for (not for streams) and for every non-200 reply."""


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection carrying one request at a time."""

    def __init__(self) -> None:
        # httptools looks its callbacks up once; a bound list.append as `on_body`
        # costs no Python frame per HTTP chunk (one chunk per SSE event).
        self._pieces: list[bytes] = []
        self.on_body = self._pieces.append
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.keep_alive = True
        self._reset(0.0, None)

    def _reset(self, started: float, gaps: list[float] | None) -> None:
        self.started = started
        self._now = started
        self._finished = 0.0
        self._status = 0
        self._gaps = gaps
        self._pieces.clear()
        self._events = 0
        self._first: float | None = None
        self._last = 0.0
        self._carry = b""

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        # One timestamp per read: events that arrived together arrived together.
        self._now = time.perf_counter()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(TransportError(f"bad HTTP response: {exc}"))
            self.close()
            return
        if self._gaps is not None and self._pieces and self._status == 200:
            self._count_events(b"".join(self._pieces), self._gaps)
            self._pieces.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(TransportError(f"connection lost: {exc or 'closed by peer'}"))

    def _count_events(self, body: bytes, gaps: list[float]) -> None:
        """Count the `data:` events in one read's body bytes and record their gaps."""
        # Carry a tail so a `data:` split across two reads is still counted once.
        buf = self._carry + body if self._carry else body
        self._carry = b"" if buf.endswith(b"\n\n") else buf[-4:]
        n = buf.count(_DATA) - (_DONE in buf)
        if n <= 0:
            return
        now = self._now
        if self._first is None:
            self._first = now
        else:
            gaps.append(now - self._last)
        if n > 1:
            gaps.extend([0.0] * (n - 1))
        self._last = now
        self._events += n

    # httptools callbacks
    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()

    def on_message_complete(self) -> None:
        self._finished = self._now
        self.keep_alive = self._parser.should_keep_alive()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, exc: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)

    def abort(self, reason: str) -> None:
        """Fail the request in flight and drop the connection."""
        self._fail(TransportError(reason))
        self.close()

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    async def fetch(
        self, request: bytes, gaps: list[float] | None = None, keep_body: bool = False
    ) -> Reply:
        """Send one request and wait for the whole response.

        `gaps` turns on SSE event counting; gaps between events are appended to it.
        """
        if self.closed or self._transport is None:
            raise TransportError("connection is closed")
        self._waiter = asyncio.get_running_loop().create_future()
        self._reset(time.perf_counter(), gaps)
        self._transport.write(request)
        await self._waiter
        return Reply(
            status=self._status,
            started=self.started,
            finished=self._finished,
            first_event=self._first,
            events=self._events,
            body=b"".join(self._pieces) if keep_body or self._status != 200 else b"",
        )


async def connect(endpoint: Endpoint) -> Connection:
    loop = asyncio.get_running_loop()
    try:
        _, conn = await loop.create_connection(Connection, endpoint.host, endpoint.port)
    except OSError as exc:
        raise TransportError(f"cannot connect to {endpoint.host}:{endpoint.port}: {exc}") from exc
    return conn


class Pool:
    """Idle keep-alive connections to one endpoint, reused across runs."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._idle: list[Connection] = []

    async def get(self) -> Connection:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
        return await connect(self.endpoint)

    def put(self, conn: Connection) -> None:
        if conn.closed or not conn.keep_alive:
            conn.close()
        else:
            self._idle.append(conn)

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()


async def get_json(pool: Pool, path: str, api_key: str = "") -> object:
    """GET a JSON document (for readiness checks, not for load)."""
    conn = await pool.get()
    try:
        async with asyncio.timeout(5):
            reply = await conn.fetch(
                pool.endpoint.request("GET", path, api_key=api_key), None, True
            )
    except BaseException:
        conn.close()
        raise
    pool.put(conn)
    if reply.status != 200:
        raise TransportError(f"GET {path}: HTTP {reply.status}")
    return orjson.loads(reply.body)


@dataclass
class Samples:
    """What one load run collected. Times are seconds."""

    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    events: int = 0
    errors: int = 0
    error_examples: list[str] = field(default_factory=list)
    elapsed: float = 0.0
    client_cpu_s: float = 0.0
    """CPU this client process spent during the run (is the client the bottleneck?)."""

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_examples) < 3:
            self.error_examples.append(what)


@dataclass(frozen=True)
class Load:
    """One load run: the same request, `concurrency` workers, bounded by both limits."""

    request: bytes
    concurrency: int
    max_requests: int
    duration_s: float
    stream: bool
    min_events: int = 0
    """A stream with fewer `data:` events than this counts as an error."""


class _Budget:
    def __init__(self, load: Load) -> None:
        self.left = load.max_requests
        self.deadline = time.perf_counter() + load.duration_s

    def take(self) -> bool:
        if self.left <= 0 or time.perf_counter() >= self.deadline:
            return False
        self.left -= 1
        return True


Check = Callable[[Reply], str | None]


def check_reply(load: Load) -> Check:
    """Return a function saying what is wrong with a reply, or None."""

    def check(reply: Reply) -> str | None:
        if reply.status != 200:
            return f"HTTP {reply.status}: {reply.body[:200]!r}"
        if load.stream and reply.events < load.min_events:
            return f"short stream: {reply.events} events"
        if reply.body and not load.stream:
            doc = orjson.loads(reply.body)
            if not isinstance(doc, dict) or not doc.get("choices"):
                return f"no choices in {reply.body[:200]!r}"
        return None

    return check


async def _watchdog(in_flight: set[Connection]) -> None:
    """Abort requests older than REQUEST_TIMEOUT_S.

    One sweep a second instead of an `asyncio.timeout` per request: that timer
    costs the client (which shares a core with the upstream) about 10% of its CPU.
    """
    while True:
        await asyncio.sleep(1.0)
        oldest = time.perf_counter() - REQUEST_TIMEOUT_S
        for conn in [c for c in in_flight if c.started < oldest]:
            conn.abort(f"no complete reply after {REQUEST_TIMEOUT_S:.0f} s")


async def _worker(
    pool: Pool, load: Load, budget: _Budget, samples: Samples, in_flight: set[Connection]
) -> None:
    check = check_reply(load)
    gaps = samples.gaps if load.stream else None
    first = True
    while budget.take():
        try:
            conn = await pool.get()
        except TransportError as exc:
            samples.error(str(exc))
            await asyncio.sleep(ERROR_BACKOFF_S)
            continue
        in_flight.add(conn)
        try:
            reply = await conn.fetch(load.request, gaps, first)
        except TransportError as exc:
            conn.close()
            samples.error(str(exc))
            await asyncio.sleep(ERROR_BACKOFF_S)
            continue
        finally:
            in_flight.discard(conn)
        pool.put(conn)
        # Only the first body of each worker is kept and parsed; status and
        # event counts are checked on every reply.
        first = False
        problem = check(reply)
        if problem:
            samples.error(problem)
            continue
        record(samples, reply)


def record(samples: Samples, reply: Reply) -> None:
    samples.latencies.append(reply.finished - reply.started)
    if reply.first_event is not None:
        samples.ttfts.append(reply.first_event - reply.started)
    samples.events += reply.events


async def run_load(pool: Pool, load: Load) -> Samples:
    """Run `load` against `pool`'s endpoint and return what it measured."""
    samples = Samples()
    budget = _Budget(load)
    started, cpu = time.perf_counter(), time.process_time()
    in_flight: set[Connection] = set()
    watchdog = asyncio.create_task(_watchdog(in_flight))
    try:
        async with asyncio.TaskGroup() as tg:
            for _ in range(load.concurrency):
                tg.create_task(_worker(pool, load, budget, samples, in_flight))
    finally:
        watchdog.cancel()
    samples.elapsed = time.perf_counter() - started
    samples.client_cpu_s = time.process_time() - cpu
    return samples
