"""The agent's side of InferenceService.Multiplex: many requests, one stream.

Each opened request runs `serve_request` as its own task and puts frames on one
outgoing queue; the writer sends whatever frames are queued in one message and
never waits for more. A cancel (or the stream ending) cancels the request's
task, which closes the engine request.

Flow control: a request may have `window_bytes` of chunks sent and not yet
granted back by the facade (MultiplexCredit, as its client reads). At the
window it stops pulling from the engine, whose HTTP connection then stops being
read: a client that stops reading holds a constant amount of memory here, not
its whole answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc

from kscope.v1 import inference_pb2
from kscope_common.mailbox import Mailbox
from node_agent.engines.base import copy_usage
from node_agent.request_life import AgentCore, RequestFailed, endpoint_of, serve_request

log = logging.getLogger(__name__)

Frame = inference_pb2.MultiplexFrame


class Window:
    """The bytes one request may still send before the facade grants more. A
    frame may overdraw it (a frame is never split); the overdraw is paid back
    from the next grants, so the window never creeps up."""

    __slots__ = ("_granted", "available", "limited")

    def __init__(self, size: int):
        self.limited = size > 0
        """False: no flow control (a facade that asked for none, or a one-piece answer)."""
        self.available = size
        self._granted: asyncio.Event | None = None

    def spend(self, nbytes: int) -> None:
        self.available -= nbytes

    @property
    def closed(self) -> bool:
        return self.limited and self.available <= 0

    async def wait(self) -> None:
        """Return once the window is open again."""
        while self.closed:
            self._granted = asyncio.Event()
            await self._granted.wait()

    def grant(self, nbytes: int) -> None:
        self.available += nbytes
        if self._granted is not None:
            self._granted.set()


def frame_size(frame: Frame) -> int:
    return sum(len(c) for c in frame.chunks)


class MultiplexSession:
    """One facade's Multiplex stream."""

    def __init__(self, core: AgentCore):
        self._core = core
        self._out: Mailbox[Frame] = Mailbox()
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._windows: dict[int, Window] = {}

    async def serve(
        self, requests: AsyncIterator[inference_pb2.MultiplexRequest]
    ) -> AsyncIterator[inference_pb2.MultiplexResponse]:
        reader = asyncio.create_task(self._read(requests))
        reader.add_done_callback(lambda _: self._out.wake())
        try:
            while True:
                if not self._out and reader.done() and not self._tasks:
                    return  # the facade closed its side and nothing is running
                # Whatever every request queued since the last message, in one.
                frames = await self._out.take()
                if frames:
                    yield inference_pb2.MultiplexResponse(frames=frames)
        finally:
            reader.cancel()
            for task in self._tasks.values():
                task.cancel()

    async def _read(self, requests: AsyncIterator[inference_pb2.MultiplexRequest]) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            async for request in requests:
                for opened in request.opens:
                    self._windows[opened.stream_id] = Window(opened.window_bytes)
                    task = asyncio.create_task(self._run(opened))
                    self._tasks[opened.stream_id] = task
                for credit in request.credits:
                    window = self._windows.get(credit.stream_id)
                    if window is not None:
                        window.grant(credit.bytes)
                for cancel in request.cancels:
                    running = self._tasks.pop(cancel.stream_id, None)
                    if running is not None:
                        running.cancel()

    async def _run(self, opened: inference_pb2.MultiplexOpen) -> None:
        sid = opened.stream_id
        window = self._windows[sid]
        put = self._out.put
        try:
            endpoint = endpoint_of(opened.kind)
            life = serve_request(
                self._core, endpoint, opened.body, opened.envelope, opened.content_type
            )
            async with contextlib.aclosing(life) as outputs:
                async for output in outputs:
                    frame = Frame(stream_id=sid, chunks=output.chunks)
                    copy_usage(output, frame.usage)
                    if output.content_type:
                        frame.content_type = output.content_type
                    put(frame)
                    window.spend(frame_size(frame))
                    if window.closed:
                        await window.wait()
            put(Frame(stream_id=sid, end=True))
        except RequestFailed as failed:
            put(Frame(stream_id=sid, end=True, error=failed.error))
        finally:
            self._tasks.pop(sid, None)
            self._windows.pop(sid, None)
            self._out.wake()  # the writer may be waiting for the last request to end
