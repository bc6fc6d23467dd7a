"""A list with one waiting reader: the token path's queue.

asyncio.Queue costs a future and a deque per item on both ends; on the token
path, where each chunk passes through two of these on each side, that shows.
A mailbox hands over whatever has arrived in one list, with one wake-up however
many items came in between: the reader takes everything ready, never waits for
more, and so coalesces what is ready without holding anything back.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

T = TypeVar("T")


class Mailbox(Generic[T]):
    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[T] = []
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: T) -> None:
        self._items.append(item)
        self.wake()

    def wake(self) -> None:
        """Let the reader look again (something it watches changed)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __bool__(self) -> bool:
        return bool(self._items)

    async def take(self) -> list[T]:
        """Everything that arrived; waits when nothing did (may return [] after a wake())."""
        if not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items, self._items = self._items, []
        return items
