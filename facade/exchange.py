"""One request's exchange with an agent, over its own gRPC call or over the
facade's shared Multiplex stream to that agent. Both look the same to the proxy:
an async iterator of chunk lists that raises AgentFailure, and `cancel()`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from facade.errors import ApiError, from_rpc_error
from kscope.v1 import inference_pb2, inference_pb2_grpc
from kscope_common.errors import http_for_grpc

log = logging.getLogger(__name__)


class AgentFailure(Exception):
    """The agent or its engine failed the request."""

    def __init__(self, error: ApiError, code: grpc.StatusCode, engine_error: bool):
        super().__init__(error.message)
        self.error = error
        self.code = code
        self.engine_error = engine_error

    @property
    def transport(self) -> bool:
        """The agent could not be reached (so another instance may do)."""
        return self.code is grpc.StatusCode.UNAVAILABLE and not self.engine_error


class PerCallExchange:
    """One server-streaming RPC for one request."""

    def __init__(self, call: Any, model: str):
        self._call = call
        self._model = model

    async def chunks(self) -> AsyncIterator[Sequence[bytes]]:
        try:
            async for message in self._call:
                yield message.chunks
        except grpc.aio.AioRpcError as exc:
            error = from_rpc_error(exc, self._model)
            raise AgentFailure(error, exc.code(), bool(error.raw_error)) from exc

    def cancel(self) -> None:
        self._call.cancel()


_CANCELLED = inference_pb2.MultiplexFrame(
    end=True, error_code=grpc.StatusCode.CANCELLED.value[0], error_message="cancelled"
)
_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _frame_failure(frame: inference_pb2.MultiplexFrame, model: str) -> AgentFailure:
    code = _CODES.get(frame.error_code, grpc.StatusCode.UNKNOWN)
    if frame.http_status:
        error = ApiError(frame.http_status, frame.error_message, raw_error=frame.error_body)
        return AgentFailure(error, code, engine_error=True)
    if code is grpc.StatusCode.UNAVAILABLE:
        error = ApiError(
            503,
            f"the instance serving {model!r} is unavailable: {frame.error_message}",
            "service_unavailable_error",
            code="instance_unavailable",
            retry_after_s=1,
        )
    else:
        status, error_type = http_for_grpc(code)
        error = ApiError(status, frame.error_message or code.name, error_type)
    return AgentFailure(error, code, engine_error=False)


class MultiplexExchange:
    def __init__(self, session: AgentSession, stream_id: int, model: str):
        self._session = session
        self._id = stream_id
        self._model = model
        self.frames: asyncio.Queue[inference_pb2.MultiplexFrame] = asyncio.Queue()
        self.ended = False

    async def chunks(self) -> AsyncIterator[Sequence[bytes]]:
        while True:
            frame = await self.frames.get()
            if frame.end:
                self.ended = True
                if frame.error_code:
                    raise _frame_failure(frame, self._model)
                if frame.chunks:
                    yield frame.chunks
                return
            yield frame.chunks

    def cancel(self) -> None:
        if not self.ended:
            self.ended = True
            self._session.cancel(self._id)
            self.frames.put_nowait(_CANCELLED)


MULTIPLEX_BATCH_BYTES = 4 * 1024 * 1024
"""Bodies packed into one Multiplex message at most (a larger one goes alone);
well under the 64 MiB message limit, so a burst of large bodies never fails
the stream every request on the agent shares."""


def pack_opens(
    opens: list[inference_pb2.MultiplexOpen], budget: int
) -> list[list[inference_pb2.MultiplexOpen]]:
    """Consecutive batches whose bodies add up to at most `budget` bytes; an
    open larger than the budget makes a batch of its own. Order is kept."""
    batches: list[list[inference_pb2.MultiplexOpen]] = []
    size = budget + 1  # start a new batch with the first open
    for item in opens:
        cost = len(item.body)
        if size + cost > budget:
            batches.append([])
            size = 0
        batches[-1].append(item)
        size += cost
    return batches


class AgentSession:
    """The facade's one Multiplex stream to an agent, opened on first use and
    again after it breaks. Opens and cancels queued together go in one message."""

    def __init__(self, stub: inference_pb2_grpc.InferenceServiceAsyncStub, address: str):
        self._stub = stub
        self._address = address
        self._exchanges: dict[int, MultiplexExchange] = {}
        self._next_id = 1
        self._opens: list[inference_pb2.MultiplexOpen] = []
        self._cancels: list[inference_pb2.MultiplexCancel] = []
        self._wake = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._call: Any = None

    def open(
        self, kind: int, envelope: inference_pb2.RequestEnvelope, body: bytes, model: str
    ) -> MultiplexExchange:
        if self._reader is None or self._reader.done():
            self._start()
        stream_id = self._next_id
        self._next_id += 1
        exchange = MultiplexExchange(self, stream_id, model)
        self._exchanges[stream_id] = exchange
        self._opens.append(
            inference_pb2.MultiplexOpen(
                stream_id=stream_id,
                kind=kind,  # type: ignore[arg-type]
                envelope=envelope,
                body=body,
            )
        )
        self._wake.set()
        return exchange

    @property
    def idle(self) -> bool:
        """No request is open on the stream."""
        return not self._exchanges

    def cancel(self, stream_id: int) -> None:
        if self._exchanges.pop(stream_id, None) is not None:
            self._cancels.append(inference_pb2.MultiplexCancel(stream_id=stream_id))
            self._wake.set()

    def _start(self) -> None:
        self._opens.clear()
        self._cancels.clear()
        self._wake = asyncio.Event()  # a fresh one: the old stream's writer must not take it
        self._call = self._stub.Multiplex(self._outgoing(self._wake))
        self._reader = asyncio.create_task(self._read(self._call))

    async def _outgoing(self, wake: asyncio.Event) -> AsyncIterator[inference_pb2.MultiplexRequest]:
        while wake is self._wake:
            await wake.wait()
            wake.clear()
            opens, self._opens = self._opens, []
            cancels, self._cancels = self._cancels, []
            if not opens:
                if cancels:
                    yield inference_pb2.MultiplexRequest(cancels=cancels)
                continue
            # Never one message past gRPC's limit: large bodies travel alone.
            for batch in pack_opens(opens, MULTIPLEX_BATCH_BYTES):
                yield inference_pb2.MultiplexRequest(opens=batch, cancels=cancels)
                cancels = []

    async def _read(self, call: Any) -> None:
        failure = "the agent closed the stream"
        try:
            async for response in call:
                for frame in response.frames:
                    exchange = self._exchanges.get(frame.stream_id)
                    if exchange is None:
                        continue
                    if frame.end:
                        del self._exchanges[frame.stream_id]
                    exchange.frames.put_nowait(frame)
        except grpc.aio.AioRpcError as exc:
            failure = exc.details() or exc.code().name
            log.warning("multiplex stream to %s broke: %s", self._address, failure)
        # Every request still open on this stream fails now, not later.
        lost = inference_pb2.MultiplexFrame(
            end=True, error_code=grpc.StatusCode.UNAVAILABLE.value[0], error_message=failure
        )
        for exchange in self._exchanges.values():
            exchange.frames.put_nowait(lost)
        self._exchanges.clear()

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
