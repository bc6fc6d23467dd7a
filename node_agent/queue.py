"""The request queue in front of an engine: at most `max_concurrency` requests
run at once, up to `max_queue_size` more wait, each for at most `timeout_s` —
by priority, then round-robin by caller (fair share between owners), each
caller's own in arrival order. Streaming and non-streaming requests queue alike.

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
    """Admission control for one engine; reports into `load`.

    When every slot is busy, waiting requests are served by priority (higher
    first), and within a priority round-robin by caller (the key's owner the
    facade names): the caller served least recently goes next, each caller's
    own requests in arrival order. An owner with 64 queued requests (one at
    the engine) and another with one: the second is served next.
    """

    def __init__(self, limits: QueueLimits, load: Load):
        self.limits = limits
        self._load = load
        self._active = 0
        self._lines: dict[int, dict[str, deque[asyncio.Future[None]]]] = {}
        """priority → caller → that caller's waiters (dicts keep arrival order)."""
        self._waiting = 0
        self._last_served: dict[str, int] = {}
        """When each caller last got a slot (a counter, not a clock)."""
        self._serves = 0

    @property
    def active(self) -> int:
        """Requests holding a slot."""
        return self._active

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        return self._waiting

    def waiting_by_caller(self) -> dict[str, int]:
        """Requests waiting now, per caller (for /v1/queue/stats)."""
        counts: dict[str, int] = {}
        for callers in self._lines.values():
            for caller, line in callers.items():
                counts[caller] = counts.get(caller, 0) + sum(1 for w in line if not w.done())
        return counts

    @contextlib.asynccontextmanager
    async def slot(self, caller: str = "", priority: int = 0) -> AsyncIterator[None]:
        """Hold a slot for the body of the `async with`; raise QueueFull or
        QueueTimeout when none can be had."""
        await self._acquire(caller, priority)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, caller: str, priority: int) -> None:
        limits = self.limits
        if limits.unlimited or (self._active < limits.max_concurrency and not self._waiting):
            self._active += 1
            self._served(caller)
            self._report()
            return
        if self._waiting >= limits.max_queue_size:
            raise QueueFull(limits)
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        line = self._lines.setdefault(priority, {}).setdefault(caller, deque())
        line.append(granted)
        self._waiting += 1
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
                self._forget(priority, caller, granted)
                self._report()
            if isinstance(exc, TimeoutError):
                raise QueueTimeout(limits) from exc
            raise

    def _forget(self, priority: int, caller: str, waiter: asyncio.Future[None]) -> None:
        callers = self._lines.get(priority, {})
        line = callers.get(caller)
        if line is not None and waiter in line:
            line.remove(waiter)
            self._waiting -= 1
            if not line:
                del callers[caller]
            if not callers:
                self._lines.pop(priority, None)

    def _served(self, caller: str) -> None:
        self._serves += 1
        self._last_served[caller] = self._serves
        if len(self._last_served) > 10_000:  # callers come and go; keep the recent ones
            keep = sorted(self._last_served.items(), key=lambda kv: kv[1])[-1000:]
            self._last_served = dict(keep)

    def _next_waiter(self) -> asyncio.Future[None] | None:
        """The next live waiter: highest priority, then the caller served least
        recently (ties: the one that came first), then that caller's oldest."""
        for priority in sorted(self._lines, reverse=True):
            callers = self._lines[priority]
            while callers:
                caller = min(callers, key=lambda c: self._last_served.get(c, 0))
                line = callers[caller]
                waiter = line.popleft()
                self._waiting -= 1
                if not line:
                    del callers[caller]
                if not waiter.done():
                    self._served(caller)
                    return waiter
            del self._lines[priority]
        return None

    def _release(self) -> None:
        # Hand the slot straight to the next waiter, so nobody who arrives
        # meanwhile can overtake the queue; `active` stays the same then.
        waiter = self._next_waiter()
        if waiter is not None:
            waiter.set_result(None)
            self._report()
            return
        self._active -= 1
        self._report()

    def _report(self) -> None:
        self._load.in_flight = self._active
        self._load.queued = self._waiting
