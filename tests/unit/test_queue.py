"""The request queue in front of an engine (node_agent/queue.py): admission,
order, 429 when full, 504 past the timeout, and a cancelled waiter or holder
freeing its place at once, with the load report exact throughout."""

from __future__ import annotations

import asyncio

import pytest

from node_agent.load import Load
from node_agent.queue import QueueFull, QueueLimits, QueueTimeout, RequestQueue


def _queue(concurrency: int = 1, size: int = 2, timeout_s: float = 5.0) -> RequestQueue:
    return RequestQueue(QueueLimits(concurrency, size, timeout_s), Load())


async def _hold(queue: RequestQueue, release: asyncio.Event, log: list[str], name: str) -> None:
    async with queue.slot():
        log.append(name)
        await release.wait()


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_unlimited_admits_everyone_and_counts_in_flight() -> None:
    load = Load()
    queue = RequestQueue(QueueLimits(max_concurrency=0), load)
    release = asyncio.Event()
    log: list[str] = []
    tasks = [asyncio.create_task(_hold(queue, release, log, str(i))) for i in range(50)]
    await _settle()
    assert len(log) == 50
    assert (load.in_flight, load.queued) == (50, 0)
    release.set()
    await asyncio.gather(*tasks)
    assert (load.in_flight, load.queued) == (0, 0)


async def test_one_runs_two_wait_the_rest_get_429_in_order() -> None:
    queue = _queue(concurrency=1, size=2)
    release = asyncio.Event()
    log: list[str] = []
    tasks = [asyncio.create_task(_hold(queue, release, log, str(i))) for i in range(5)]
    await _settle()
    assert log == ["0"]
    assert (queue.active, queue.waiting) == (1, 2)
    full = [t for t in tasks if t.done()]
    assert len(full) == 2
    assert all(isinstance(t.exception(), QueueFull) for t in full)
    error = full[0].exception()
    assert isinstance(error, QueueFull) and error.http_status == 429
    release.set()
    await asyncio.gather(*(t for t in tasks if t not in full))
    assert log == ["0", "1", "2"]  # first come, first served
    assert (queue.active, queue.waiting) == (0, 0)


async def test_waiting_past_the_timeout_is_504_and_leaves_the_queue() -> None:
    load = Load()
    queue = RequestQueue(QueueLimits(1, 5, timeout_s=0.05), load)
    release = asyncio.Event()
    log: list[str] = []
    holder = asyncio.create_task(_hold(queue, release, log, "holder"))
    await _settle()
    with pytest.raises(QueueTimeout) as info:
        async with queue.slot():
            pytest.fail("must not get a slot")
    assert info.value.http_status == 504
    assert b"queue_timeout" in info.value.openai_error()
    assert (load.in_flight, load.queued) == (1, 0)
    release.set()
    await holder


async def test_cancelled_waiter_frees_its_place_at_once() -> None:
    load = Load()
    queue = RequestQueue(QueueLimits(1, 1, 5.0), load)
    release = asyncio.Event()
    log: list[str] = []
    holder = asyncio.create_task(_hold(queue, release, log, "holder"))
    waiter = asyncio.create_task(_hold(queue, release, log, "waiter"))
    await _settle()
    assert (load.in_flight, load.queued) == (1, 1)
    waiter.cancel()
    await _settle()
    assert (load.in_flight, load.queued) == (1, 0)
    # Its place is free: a newcomer may wait now instead of getting a 429.
    newcomer = asyncio.create_task(_hold(queue, release, log, "newcomer"))
    await _settle()
    assert not newcomer.done()
    release.set()
    await asyncio.gather(holder, newcomer)
    assert log == ["holder", "newcomer"]


async def test_cancelled_holder_hands_its_slot_to_the_next() -> None:
    load = Load()
    queue = RequestQueue(QueueLimits(1, 2, 5.0), load)
    release = asyncio.Event()
    log: list[str] = []
    holder = asyncio.create_task(_hold(queue, asyncio.Event(), log, "holder"))
    nxt = asyncio.create_task(_hold(queue, release, log, "next"))
    await _settle()
    holder.cancel()  # a client that went away mid-generation
    await _settle()
    assert log == ["holder", "next"]
    assert (load.in_flight, load.queued) == (1, 0)
    release.set()
    await nxt
    assert (load.in_flight, load.queued) == (0, 0)


async def test_waiter_cancelled_just_after_being_granted_passes_the_slot_on() -> None:
    queue = _queue(concurrency=1, size=2)
    release = asyncio.Event()
    log: list[str] = []
    gate = asyncio.Event()
    holder = asyncio.create_task(_hold(queue, gate, log, "holder"))
    first = asyncio.create_task(_hold(queue, release, log, "first"))
    second = asyncio.create_task(_hold(queue, release, log, "second"))
    await _settle()
    gate.set()
    await asyncio.sleep(0)  # the holder leaves and hands the slot to `first`...
    first.cancel()  # ...which is cancelled before it runs again
    release.set()
    await asyncio.gather(holder, second)
    assert "first" not in log and log[-1] == "second"
    assert (queue.active, queue.waiting) == (0, 0)


async def test_queue_size_zero_refuses_when_busy() -> None:
    queue = _queue(concurrency=2, size=0)
    release = asyncio.Event()
    log: list[str] = []
    tasks = [asyncio.create_task(_hold(queue, release, log, str(i))) for i in range(3)]
    await _settle()
    assert len(log) == 2
    assert isinstance(tasks[2].exception(), QueueFull)
    release.set()
    await asyncio.gather(*tasks[:2])


async def _served_in_order(queue: RequestQueue, callers: list[tuple[str, int]]) -> list[str]:
    """Queue one request per (caller, priority) behind a holder, then let them
    through one at a time; returns the callers in the order they got the slot."""
    order: list[str] = []
    gate = asyncio.Event()

    async def hold() -> None:
        async with queue.slot("holder"):
            await gate.wait()

    async def ask(caller: str, priority: int) -> None:
        async with queue.slot(caller, priority):
            order.append(caller)
            await asyncio.sleep(0)

    holder = asyncio.create_task(hold())
    await _settle()
    tasks = []
    for caller, priority in callers:
        tasks.append(asyncio.create_task(ask(caller, priority)))
        await asyncio.sleep(0)  # arrival order is creation order
    await _settle()
    assert queue.waiting == len(callers)
    gate.set()
    await asyncio.gather(holder, *tasks)
    assert (queue.active, queue.waiting) == (0, 0)
    return order


async def test_waiting_requests_take_turns_by_caller() -> None:
    queue = _queue(concurrency=1, size=100)
    order = await _served_in_order(queue, [("a", 0)] * 20 + [("b", 0)])
    assert order[:2] == ["a", "b"]  # B second, not twenty-first
    assert order.count("a") == 20


async def test_turns_rotate_over_every_caller_keeping_each_ones_order() -> None:
    queue = _queue(concurrency=1, size=100)
    order = await _served_in_order(queue, [("a", 0)] * 3 + [("b", 0)] * 2 + [("c", 0)])
    assert order == ["a", "b", "c", "a", "b", "a"]


async def test_a_higher_priority_goes_first() -> None:
    queue = _queue(concurrency=1, size=100)
    order = await _served_in_order(queue, [("batch", 0)] * 5 + [("portal", 5)])
    assert order[0] == "portal"


async def test_waiting_by_caller_counts_the_lines() -> None:
    queue = _queue(concurrency=1, size=100)
    gate = asyncio.Event()

    async def hold(caller: str) -> None:
        async with queue.slot(caller):
            await gate.wait()

    tasks = [asyncio.create_task(hold(c)) for c in ["x", "a", "a", "b"]]
    await _settle()
    assert queue.waiting_by_caller() == {"a": 2, "b": 1}
    gate.set()
    await asyncio.gather(*tasks)
    assert queue.waiting_by_caller() == {}


async def test_the_caller_at_the_engine_waits_its_turn_behind_a_newcomer() -> None:
    """A's first request got the slot without queueing; A's next ones queue, then
    B arrives: B was served least recently (never), so B goes next."""
    queue = _queue(concurrency=1, size=100)
    order: list[str] = []
    gate = asyncio.Event()

    async def ask(caller: str, first: bool = False) -> None:
        async with queue.slot(caller):
            order.append(caller)
            if first:
                await gate.wait()

    tasks = [asyncio.create_task(ask("a", first=True))]
    await _settle()
    tasks += [asyncio.create_task(ask("a")) for _ in range(5)]
    await _settle()
    tasks.append(asyncio.create_task(ask("b")))
    await _settle()
    gate.set()
    await asyncio.gather(*tasks)
    assert order[:3] == ["a", "b", "a"]
