"""A client's half of one ASGI HTTP request, backed by lists, for driving the
facade's raw-ASGI token path in process: no server, no sockets, every message
the app sends kept in order so a test can assert them exactly."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import MutableMapping
from typing import Any

Message = MutableMapping[str, Any]


REQUEST_ID = b"req-test"
"""Every scope's X-Request-Id: the facade answers with it."""


def http_scope(
    path: str = "/v1/chat/completions", headers: list[tuple[bytes, bytes]] | None = None
) -> dict[str, Any]:
    """The scope of a POST as uvicorn hands it to the app."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [
            (b"content-type", b"application/json"),
            (b"x-request-id", REQUEST_ID),
            *(headers or []),
        ],
    }


class ClientReceive:
    """ASGI `receive`: the request body (in the parts given), then nothing
    until `disconnect()`, as a client that sent its request and waits.
    `complete=False` leaves the body unfinished (the last part says more_body)."""

    def __init__(self, *parts: bytes, complete: bool = True):
        parts = parts or (b"",)
        self._messages: deque[Message] = deque(
            {"type": "http.request", "body": part, "more_body": i < len(parts) - 1 or not complete}
            for i, part in enumerate(parts)
        )
        self._gone = asyncio.Event()
        self.calls = 0

    async def __call__(self) -> Message:
        self.calls += 1
        if self._messages:
            return self._messages.popleft()
        await self._gone.wait()
        return {"type": "http.disconnect"}

    def disconnect(self) -> None:
        """The client closes its connection."""
        self._gone.set()


class ClientSend:
    """ASGI `send` that keeps every message; `stall(after)` makes every send
    past the first `after` messages block forever, as a client that stopped
    reading once its buffers filled."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._stall_after: int | None = None
        self.sent = asyncio.Event()
        """Set on every message (tests wait for the first one)."""

    async def __call__(self, message: Message) -> None:
        if self._stall_after is not None and len(self.messages) >= self._stall_after:
            await asyncio.Event().wait()
        self.messages.append(dict(message))
        self.sent.set()

    def stall(self, after: int = 0) -> None:
        self._stall_after = after

    @property
    def start(self) -> Message:
        assert self.messages and self.messages[0]["type"] == "http.response.start"
        return self.messages[0]

    @property
    def status(self) -> int:
        return int(self.start["status"])

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.start["headers"])

    @property
    def bodies(self) -> list[bytes]:
        """Each http.response.body message's bytes, in order."""
        return [m["body"] for m in self.messages[1:]]

    @property
    def body(self) -> bytes:
        return b"".join(self.bodies)

    @property
    def ended(self) -> bool:
        """The last message closed the response (no more_body)."""
        last = self.messages[-1] if self.messages else {}
        return last.get("type") == "http.response.body" and not last.get("more_body", False)

    async def wait_for(self, count: int, timeout_s: float = 2.0) -> None:
        """Until at least `count` messages were sent."""
        async with asyncio.timeout(timeout_s):
            while len(self.messages) < count:
                self.sent.clear()
                await self.sent.wait()
