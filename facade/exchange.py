"""One request's exchange with an agent, over its own gRPC call or over the
facade's shared Multiplex stream to that agent. The proxy sees only `Exchange`:
an async iterator of chunk lists that raises AgentFailure, `consumed(chunks)`
once they reached the client, and `cancel()`. Which transport a facade uses
is chosen once (`opener_for`), never per request; an agent running in the
facade's own process is called directly (facade/local_exchange.py).

Flow control: on the Multiplex stream each request has a window (WINDOW_BYTES)
of chunks the agent may send before this side grants more; it grants as its
client takes the chunks, so a client that stops reading stops its request at
the agent and the engine. One call per request gets the same from HTTP/2's own
per-stream windows, since the proxy reads the call only as its client reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import grpc

from facade.errors import failure, request_error
from facade.local_exchange import LocalExchange
from kscope.v1 import inference_pb2, inference_pb2_grpc
from kscope_common.mailbox import Mailbox

if TYPE_CHECKING:
    from facade.routing import Target

log = logging.getLogger(__name__)

ERROR_METADATA_KEY = "kscope-request-error-bin"
"""Trailing metadata with a failed call's serialized RequestError (the agent's)."""
WINDOW_BYTES = 256 * 1024
"""Chunk bytes one request may have in flight from the agent to this facade."""
MULTIPLEX_BATCH_BYTES = 4 * 1024 * 1024
"""Bodies packed into one Multiplex message at most (a larger one goes alone);
well under the 64 MiB message limit, so a burst of large bodies never fails
the stream every request on the agent shares."""


class Exchange(Protocol):
    usage: inference_pb2.Usage | None
    """The engine's token counts, once a message carried them."""
    content_type: str
    """A one-piece answer's Content-Type when the engine's was not JSON (else empty)."""

    def chunks(self) -> AsyncGenerator[Sequence[bytes], None]:
        """The engine's chunks as they arrive; AgentFailure when the request failed."""
        ...

    def consumed(self, chunks: Sequence[bytes]) -> None:
        """These chunks reached the client (flow control; only a transport
        that grants credit counts their bytes)."""
        ...

    def cancel(self) -> None:
        """Abort the request at the agent (the client left, or it timed out)."""
        ...


class Opener(Protocol):
    def __call__(
        self,
        target: Target,
        kind: int,
        request: Any,
        model: str,
        rpc: str,
        timeout_s: float | None,
    ) -> Exchange: ...


class PerCallExchange:
    """One server-streaming RPC for one request."""

    def __init__(self, call: Any, model: str, generic: bool):
        self._call = call
        self._model = model
        self._generic = generic
        """The call is InferenceService.Inference (only its answers carry a content type)."""
        self._cancelled = False
        self.usage: inference_pb2.Usage | None = None
        self.content_type = ""

    async def chunks(self) -> AsyncGenerator[Sequence[bytes], None]:
        try:
            async for message in self._call:
                if self._generic and message.content_type:
                    self.content_type = message.content_type
                if message.HasField("usage"):
                    self.usage = message.usage
                    if not message.chunks:
                        continue  # the usage the agent asked the engine for
                yield message.chunks
        except grpc.aio.AioRpcError as exc:
            raise failure(_described(exc), self._model) from exc
        except asyncio.CancelledError:
            # grpc.aio ends a call cancelled here (the client left) with
            # CancelledError in its reader; only a cancelled task may see one.
            task = asyncio.current_task()
            if self._cancelled and task is not None and not task.cancelling():
                cancelled = request_error(grpc.StatusCode.CANCELLED, "cancelled")
                raise failure(cancelled, self._model) from None
            raise

    def consumed(self, chunks: Sequence[bytes]) -> None:
        """HTTP/2 flow control does it: the call is read as the client reads."""

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()


def _described(exc: grpc.aio.AioRpcError) -> inference_pb2.RequestError:
    """The agent's RequestError when it sent one, else the call's own status."""
    for item in exc.trailing_metadata() or ():
        key, value = item[0], item[1]  # type: ignore[index]
        if key == ERROR_METADATA_KEY and isinstance(value, bytes):
            with contextlib.suppress(Exception):
                return inference_pb2.RequestError.FromString(value)
    return request_error(exc.code(), exc.details() or exc.code().name)


CALL_DEADLINE_SLACK_S = 5.0
"""The call's gRPC deadline is this much later than the proxy's own total cap,
so the proxy's timer (which knows to say request_timeout) always fires first;
the deadline only makes sure the agent gives up too."""


def open_per_call(
    target: Target, kind: int, request: Any, model: str, rpc: str, timeout_s: float | None
) -> Exchange:
    deadline = timeout_s + CALL_DEADLINE_SLACK_S if timeout_s else None
    call = getattr(target.stub, rpc)(request, timeout=deadline)
    return PerCallExchange(call, model, generic=type(request) is inference_pb2.InferenceRequest)


def open_multiplexed(
    target: Target, kind: int, request: Any, model: str, rpc: str, timeout_s: float | None
) -> Exchange:
    # Only the generic request has a content type (the three first kinds are JSON).
    generic = type(request) is inference_pb2.InferenceRequest
    content_type = request.content_type if generic else ""
    return target.session.open(kind, request.envelope, request.body, model, content_type)


def opener_for(multiplex: bool) -> Opener:
    """How this facade reaches agents: over gRPC the way its settings say
    (decided once), except an agent in this same process (`kscope serve`'s),
    whose request life it runs directly (facade/local_exchange.py)."""
    remote = open_multiplexed if multiplex else open_per_call

    def open_exchange(
        target: Target, kind: int, request: Any, model: str, rpc: str, timeout_s: float | None
    ) -> Exchange:
        if target.local is not None:
            return LocalExchange(target.local, kind, request, model)
        return remote(target, kind, request, model, rpc, timeout_s)

    return open_exchange


_CANCELLED = inference_pb2.MultiplexFrame(
    end=True,
    error=inference_pb2.RequestError(
        grpc_code=grpc.StatusCode.CANCELLED.value[0], message="cancelled"
    ),
)


class MultiplexExchange:
    def __init__(self, session: AgentSession, stream_id: int, model: str):
        self._session = session
        self._id = stream_id
        self._model = model
        self.frames: Mailbox[inference_pb2.MultiplexFrame] = Mailbox()
        self.ended = False
        self._ungranted = 0
        """Bytes the client took that the agent was not yet told of."""
        self.usage: inference_pb2.Usage | None = None
        self.content_type = ""

    async def chunks(self) -> AsyncGenerator[Sequence[bytes], None]:
        while True:
            frames = await self.frames.take()
            if len(frames) > 1 and not any(f.end for f in frames):
                # Several arrived at once: the client gets them in one write.
                for frame in frames:
                    if frame.HasField("usage"):
                        self.usage = frame.usage
                chunks = [c for f in frames for c in f.chunks]
                if chunks:
                    yield chunks
                continue
            for frame in frames:
                if frame.HasField("usage"):
                    self.usage = frame.usage
                if frame.content_type:  # a one-piece answer's frame
                    self.content_type = frame.content_type
                if frame.end:
                    self.ended = True
                    if frame.HasField("error"):
                        raise failure(frame.error, self._model)
                    if frame.chunks:
                        yield frame.chunks
                    return
                if frame.chunks:
                    yield frame.chunks

    def consumed(self, chunks: Sequence[bytes]) -> None:
        # Granted in halves of the window: one small message per 128 KiB read.
        self._ungranted += sum([len(c) for c in chunks])
        if self._ungranted >= WINDOW_BYTES // 2 and not self.ended:
            self._session.grant(self._id, self._ungranted)
            self._ungranted = 0

    def cancel(self) -> None:
        if not self.ended:
            self.ended = True
            self._session.cancel(self._id)
            self.frames.put(_CANCELLED)


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
    again after it breaks. Opens, credits and cancels queued together go in one
    message (a large body alone)."""

    def __init__(self, stub: inference_pb2_grpc.InferenceServiceAsyncStub, address: str):
        self._stub = stub
        self._address = address
        self._exchanges: dict[int, MultiplexExchange] = {}
        self._next_id = 1
        self._opens: list[inference_pb2.MultiplexOpen] = []
        self._cancels: list[inference_pb2.MultiplexCancel] = []
        self._credits: list[inference_pb2.MultiplexCredit] = []
        self._wake = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._call: Any = None

    @property
    def idle(self) -> bool:
        """No request is open on the stream."""
        return not self._exchanges

    def open(
        self,
        kind: int,
        envelope: inference_pb2.RequestEnvelope,
        body: bytes,
        model: str,
        content_type: str = "",
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
                # A whole answer is sent as one JSON body anyway: only streams
                # are flow-controlled (a large one-piece answer must not stall).
                window_bytes=WINDOW_BYTES if envelope.stream else 0,
                content_type=content_type,
            )
        )
        self._wake.set()
        return exchange

    def grant(self, stream_id: int, nbytes: int) -> None:
        self._credits.append(inference_pb2.MultiplexCredit(stream_id=stream_id, bytes=nbytes))
        self._wake.set()

    def cancel(self, stream_id: int) -> None:
        if self._exchanges.pop(stream_id, None) is not None:
            self._cancels.append(inference_pb2.MultiplexCancel(stream_id=stream_id))
            self._wake.set()

    def _start(self) -> None:
        self._opens.clear()
        self._cancels.clear()
        self._credits.clear()
        self._wake = asyncio.Event()  # a fresh one: the old stream's writer must not take it
        self._call = self._stub.Multiplex(self._outgoing(self._wake))
        self._reader = asyncio.create_task(self._read(self._call))

    async def _outgoing(self, wake: asyncio.Event) -> AsyncIterator[inference_pb2.MultiplexRequest]:
        while wake is self._wake:
            await wake.wait()
            wake.clear()
            opens, self._opens = self._opens, []
            cancels, self._cancels = self._cancels, []
            credits, self._credits = self._credits, []
            if not opens:
                if cancels or credits:
                    yield inference_pb2.MultiplexRequest(cancels=cancels, credits=credits)
                continue
            # Never one message past gRPC's limit: large bodies travel alone.
            for batch in pack_opens(opens, MULTIPLEX_BATCH_BYTES):
                yield inference_pb2.MultiplexRequest(opens=batch, cancels=cancels, credits=credits)
                cancels, credits = [], []

    async def _read(self, call: Any) -> None:
        reason = "the agent closed the stream"
        try:
            async for response in call:
                for frame in response.frames:
                    exchange = self._exchanges.get(frame.stream_id)
                    if exchange is None:
                        continue
                    if frame.end:
                        del self._exchanges[frame.stream_id]
                    exchange.frames.put(frame)
        except grpc.aio.AioRpcError as exc:
            reason = exc.details() or exc.code().name
            log.warning("multiplex stream to %s broke: %s", self._address, reason)
        # Every request still open on this stream fails now, not later.
        lost = inference_pb2.MultiplexFrame(
            end=True, error=request_error(grpc.StatusCode.UNAVAILABLE, reason)
        )
        for exchange in self._exchanges.values():
            exchange.frames.put(lost)
        self._exchanges.clear()

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
