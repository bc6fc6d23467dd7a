"""The agent's side of InferenceService.Multiplex: many requests, one stream.

Each opened request runs as its own task and puts frames on one outgoing queue;
the writer sends whatever frames are queued in one message and never waits for
more. A cancel (or the stream ending) cancels the request's task, which closes
the engine request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc

from kscope.v1 import inference_pb2
from kscope_common.errors import grpc_code_for_http
from kscope_common.request_stats import CANCELLED
from node_agent.engines.base import Endpoint, Engine, EngineError, copy_usage
from node_agent.load import Load, RequestClock
from node_agent.queue import RequestQueue

log = logging.getLogger(__name__)

ENDPOINTS = {
    inference_pb2.INFERENCE_KIND_CHAT_COMPLETION: Endpoint.CHAT,
    inference_pb2.INFERENCE_KIND_COMPLETION: Endpoint.COMPLETIONS,
    inference_pb2.INFERENCE_KIND_EMBEDDING: Endpoint.EMBEDDINGS,
}
Frame = inference_pb2.MultiplexFrame


class MultiplexSession:
    """One facade's Multiplex stream."""

    def __init__(self, engine: Engine, load: Load, queue: RequestQueue):
        self._engine = engine
        self._load = load
        self._queue = queue
        self._out: asyncio.Queue[Frame] = asyncio.Queue()
        self._tasks: dict[int, asyncio.Task[None]] = {}

    async def serve(
        self, requests: AsyncIterator[inference_pb2.MultiplexRequest]
    ) -> AsyncIterator[inference_pb2.MultiplexResponse]:
        reader = asyncio.create_task(self._read(requests))
        try:
            while True:
                if self._out.empty():
                    if reader.done() and not self._tasks:
                        return  # the facade closed its side and nothing is running
                    getter = asyncio.ensure_future(self._out.get())
                    await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():
                        getter.cancel()
                        continue
                    frames = [getter.result()]
                else:
                    frames = []
                while not self._out.empty():
                    frames.append(self._out.get_nowait())
                yield inference_pb2.MultiplexResponse(frames=frames)
        finally:
            reader.cancel()
            for task in self._tasks.values():
                task.cancel()

    async def _read(self, requests: AsyncIterator[inference_pb2.MultiplexRequest]) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            async for request in requests:
                for opened in request.opens:
                    task = asyncio.create_task(self._run(opened))
                    self._tasks[opened.stream_id] = task
                for cancel in request.cancels:
                    running = self._tasks.pop(cancel.stream_id, None)
                    if running is not None:
                        running.cancel()

    async def _run(self, opened: inference_pb2.MultiplexOpen) -> None:
        sid = opened.stream_id
        load = self._load
        if load.draining:
            self._fail(sid, grpc.StatusCode.UNAVAILABLE, "agent is draining")
            self._tasks.pop(sid, None)
            return
        endpoint = ENDPOINTS.get(opened.kind)
        if endpoint is None:
            self._fail(sid, grpc.StatusCode.INVALID_ARGUMENT, f"unknown kind {opened.kind}")
            self._tasks.pop(sid, None)
            return
        clock = RequestClock(load.stats, opened.envelope.stream)
        status = CANCELLED
        try:
            async with self._queue.slot():
                async for output in self._engine.generate(
                    endpoint, opened.body, opened.envelope.stream
                ):
                    clock.saw(output)
                    frame = Frame(stream_id=sid, chunks=output.chunks)
                    copy_usage(output, frame.usage)
                    self._out.put_nowait(frame)
            self._out.put_nowait(Frame(stream_id=sid, end=True))
            status = 200
        except EngineError as exc:
            status = exc.http_status
            log.info("request %s failed in the engine: %s", opened.envelope.request_id, exc.message)
            self._out.put_nowait(
                Frame(
                    stream_id=sid,
                    end=True,
                    error_code=grpc_code_for_http(exc.http_status).value[0],
                    error_message=exc.message,
                    http_status=exc.http_status,
                    error_body=exc.openai_error(),
                )
            )
        except Exception:  # an engine bug fails its request; it must not hang it
            status = 500
            log.exception("request %s failed unexpectedly", opened.envelope.request_id)
            self._fail(sid, grpc.StatusCode.INTERNAL, "the engine failed unexpectedly")
        finally:
            clock.end(status)
            self._tasks.pop(sid, None)

    def _fail(self, sid: int, code: grpc.StatusCode, message: str) -> None:
        self._out.put_nowait(
            Frame(stream_id=sid, end=True, error_code=code.value[0], error_message=message)
        )
