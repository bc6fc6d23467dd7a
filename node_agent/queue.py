"""The request queue in front of an engine: at most `max_concurrency` requests
run at once, up to `max_queue_size` more wait in arrival order, each for at most
`timeout_s`. Streaming and non-streaming requests queue alike.

Every request path of the agent (the per-call handlers and the Multiplex
stream) takes its slot with `async with queue.slot():`, so one implementation
decides admission and keeps the load report's `in_flight`/`queued` exact. A
request whose client went away leaves at once: cancelling its task removes it
from the queue, or releases its slot to the next in line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from node_agent.engines.base import EngineError
from node_agent.load import Load

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueueLimits:
    """How many requests an engine takes at once and how many may wait."""

    max_concurrency: int = 0
    """Requests the engine works on at once; 0 means no limit (and no queue)."""
    max_queue_size: int = 100
    """Requests that may wait for a slot; one more is refused with 429."""
    timeout_s: float = 300.0
    """Longest a request waits for a slot before it fails with 504."""

    @property
    def unlimited(self) -> bool:
        return self.max_concurrency <= 0


class QueueFull(EngineError):
    """Every slot is busy and the queue is full (HTTP 429, RateLimitError)."""

    def __init__(self, limits: QueueLimits):
        super().__init__(
            429,
            f"Too many requests: {limits.max_concurrency} running and "
            f"{limits.max_queue_size} waiting, the queue is full. Retry later.",
            error_type="rate_limit_error",
            code="queue_full",
        )


class QueueTimeout(EngineError):
    """The request waited longer than the queue timeout (HTTP 504)."""

    def __init__(self, limits: QueueLimits):
        super().__init__(
            504,
            f"The request waited {limits.timeout_s:g} s in the queue without getting "
            "a slot; the model is busy. Retry later.",
            error_type="timeout_error",
            code="queue_timeout",
        )


class RequestQueue:
    """FIFO admission control for one engine; reports into `load`."""

    def __init__(self, limits: QueueLimits, load: Load):
        self.limits = limits
        self._load = load
        self._active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def active(self) -> int:
        """Requests holding a slot."""
        return self._active

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiters)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold a slot for the body of the `async with`; raise QueueFull or
        QueueTimeout when none can be had."""
        await self._acquire()
        try:
            yield
        finally:
            self._release()

    async def _acquire(self) -> None:
        limits = self.limits
        if limits.unlimited or (self._active < limits.max_concurrency and not self._waiters):
            self._active += 1
            self._report()
            return
        if len(self._waiters) >= limits.max_queue_size:
            raise QueueFull(limits)
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(granted)
        self._report()
        try:
            async with asyncio.timeout(limits.timeout_s):
                await granted
        except BaseException as exc:
            if granted.done() and not granted.cancelled():
                # The slot was handed over just as we left: pass it on.
                self._release()
            else:
                granted.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(granted)
                self._report()
            if isinstance(exc, TimeoutError):
                raise QueueTimeout(limits) from exc
            raise

    def _release(self) -> None:
        # Hand the slot straight to the first live waiter, so nobody who arrives
        # meanwhile can overtake the queue; `active` stays the same then.
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._report()
                return
        self._active -= 1
        self._report()

    def _report(self) -> None:
        self._load.in_flight = self._active
        self._load.queued = len(self._waiters)
