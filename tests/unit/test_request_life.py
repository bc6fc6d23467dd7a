"""One request's life in the agent (node_agent/request_life.py) and the two
transports that encode it: the Multiplex session (node_agent/multiplex.py) and
the per-call servicer (node_agent/servicer.py). A FakeEngine stands in at the
Engine seam; the queue, the load figures and the accounting are the real ones."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import orjson
import pytest

from facade.errors import AgentFailure
from facade.exchange import ERROR_METADATA_KEY as FACADE_ERROR_KEY
from facade.exchange import MultiplexExchange, PerCallExchange
from kscope.v1 import inference_pb2
from kscope_common.request_stats import CANCELLED
from node_agent.engines.base import Endpoint, EngineError, EngineOutput, EngineRequest, Usage
from node_agent.load import Load
from node_agent.multiplex import MultiplexSession
from node_agent.queue import QueueLimits, RequestQueue
from node_agent.request_life import AgentCore, RequestFailed, serve_request
from node_agent.servicer import ERROR_METADATA_KEY, InferenceServicer

pytestmark = pytest.mark.timeout(10)

CHAT = inference_pb2.INFERENCE_KIND_CHAT_COMPLETION
ENGINE_BODY = b'{"message":"bad temperature","type":"BadRequestError","param":null,"code":400}'


class FakeEngine:
    """The Engine seam: each `generate` plays `outputs` (after `delay_s` each),
    then raises `error` or, with `hang`, waits forever. It records what the
    agent did to it: how many outputs were pulled, and whether the request was
    closed (aclose) or cancelled while the engine was working."""

    kind = "fake"
    url = ""

    def __init__(
        self,
        outputs: Sequence[EngineOutput] = (),
        *,
        delay_s: float = 0.0,
        error: BaseException | None = None,
        hang: bool = False,
    ):
        self.outputs = list(outputs)
        self.delay_s = delay_s
        self.error = error
        self.hang = hang
        self.calls: list[tuple[Endpoint, bytes, bool]] = []
        self.requests: list[EngineRequest] = []
        """Every request whole (its id and content type too)."""
        self.pulled = 0
        self.closed = 0
        """Requests ended by aclose() (GeneratorExit at a yield)."""
        self.cancelled = 0
        """Requests whose task was cancelled inside the engine."""
        self.running = 0
        self.started = asyncio.Event()
        """Set once a request has pulled its first output."""

    async def start(self) -> None:
        pass

    async def healthy(self) -> bool:
        return True

    def failure(self) -> str:
        return ""

    async def stop(self) -> None:
        pass

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        self.calls.append((request.endpoint, request.body, request.stream))
        self.requests.append(request)
        self.running += 1
        try:
            for output in self.outputs:
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                self.pulled += 1
                self.started.set()
                yield output
            if self.error is not None:
                raise self.error
            if self.hang:
                self.started.set()
                await asyncio.Event().wait()
        except GeneratorExit:
            self.closed += 1
            raise
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1


def chunks(*texts: str) -> list[EngineOutput]:
    return [EngineOutput([t.encode()]) for t in texts]


def core_of(engine: FakeEngine, limits: QueueLimits | None = None, **load: Any) -> AgentCore:
    state = Load(**load)
    return AgentCore(engine, state, RequestQueue(limits or QueueLimits(), state))


def envelope(stream: bool = True, request_id: str = "req-test") -> inference_pb2.RequestEnvelope:
    return inference_pb2.RequestEnvelope(request_id=request_id, model="m", stream=stream)


async def drain(core: AgentCore, stream: bool = True) -> list[EngineOutput]:
    life = serve_request(core, Endpoint.CHAT, b"{}", envelope(stream))
    async with contextlib.aclosing(life) as outputs:
        return [output async for output in outputs]


async def settle(rounds: int = 10) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


# ---------------------------------------------------------------- serve_request


async def test_outputs_pass_through_and_a_stream_is_counted_200() -> None:
    engine = FakeEngine(chunks("a", "b", "c"))
    core = core_of(engine)
    got = await drain(core)
    assert [o.chunks for o in got] == [[b"a"], [b"b"], [b"c"]]
    # The engine is always asked for usage: counts are exact, never chunks.
    assert engine.calls == [(Endpoint.CHAT, b'{"stream_options":{"include_usage":true}}', True)]
    stats = core.load.stats
    assert stats.by_status == {200: 1}
    assert stats.errors == 0
    assert stats.ttft.count == 1
    assert stats.generation_tokens == 0  # an engine that sent no usage: nothing guessed
    assert (core.load.in_flight, core.load.queued) == (0, 0)


async def test_the_usage_chunk_asked_for_is_counted_and_not_shown() -> None:
    usage = Usage(prompt_tokens=5, completion_tokens=2, total_tokens=7)
    usage_chunk = b'{"id":"x","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}'
    engine = FakeEngine(
        [
            EngineOutput([b'{"choices":[{"delta":{"content":"a"}}]}']),
            EngineOutput([b'{"choices":[{"finish_reason":"stop"}]}', usage_chunk], usage),
        ]
    )
    core = core_of(engine)
    got = await drain(core)
    assert [o.chunks for o in got] == [
        [b'{"choices":[{"delta":{"content":"a"}}]}'],
        [b'{"choices":[{"finish_reason":"stop"}]}'],
    ]
    assert got[-1].usage == usage  # the figures still travel, for the facade's accounting
    assert (core.load.stats.prompt_tokens, core.load.stats.generation_tokens) == (5, 2)


async def test_a_client_that_asked_for_usage_gets_its_chunk() -> None:
    usage = Usage(prompt_tokens=5, completion_tokens=2, total_tokens=7)
    usage_chunk = b'{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}'
    engine = FakeEngine([EngineOutput([usage_chunk], usage)])
    core = core_of(engine)
    body = b'{"stream":true,"stream_options":{"include_usage":true}}'
    life = serve_request(core, Endpoint.CHAT, body, envelope())
    async with contextlib.aclosing(life) as outputs:
        got = [output async for output in outputs]
    assert engine.calls == [(Endpoint.CHAT, body, True)]  # the client's bytes, unchanged
    assert [o.chunks for o in got] == [[usage_chunk]]


async def test_usage_counts_tokens_instead_of_chunks() -> None:
    usage = Usage(prompt_tokens=7, completion_tokens=11, total_tokens=18)
    core = core_of(FakeEngine([EngineOutput([b"{}"], usage)]))
    await drain(core, stream=False)
    stats = core.load.stats
    assert (stats.prompt_tokens, stats.generation_tokens) == (7, 11)
    assert stats.ttft.count == 0  # time to first token is for streams only


async def test_draining_refuses_before_the_engine_is_touched() -> None:
    engine = FakeEngine(chunks("a"))
    core = core_of(engine, draining=True)
    with pytest.raises(RequestFailed) as caught:
        await drain(core)
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE
    assert caught.value.error == inference_pb2.RequestError(
        grpc_code=grpc.StatusCode.UNAVAILABLE.value[0], message="agent is draining"
    )
    assert engine.calls == []
    assert core.load.stats.by_status == {}
    assert core.load.in_flight == 0


async def test_engine_error_is_passed_on_with_its_status_and_body() -> None:
    engine = FakeEngine(chunks("a"), error=EngineError(400, "bad temperature", ENGINE_BODY))
    core = core_of(engine)
    seen: list[EngineOutput] = []
    with pytest.raises(RequestFailed) as caught:
        life = serve_request(core, Endpoint.CHAT, b"{}", envelope())
        async with contextlib.aclosing(life) as outputs:
            async for output in outputs:
                seen.append(output)
    assert [o.chunks for o in seen] == [[b"a"]]
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.error == inference_pb2.RequestError(
        grpc_code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
        message="bad temperature",
        http_status=400,
        error_body=ENGINE_BODY,
    )
    assert core.load.stats.by_status == {400: 1}
    assert core.load.stats.errors == 1
    assert core.load.in_flight == 0


async def test_engine_error_without_a_body_gets_an_openai_object() -> None:
    core = core_of(FakeEngine(error=EngineError(503, "engine is loading")))
    with pytest.raises(RequestFailed) as caught:
        await drain(core)
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE
    assert caught.value.error.http_status == 503
    assert orjson.loads(caught.value.error.error_body) == {
        "message": "engine is loading", "type": "engine_error", "param": None, "code": None
    }  # fmt: skip
    assert core.load.stats.by_status == {503: 1}


async def test_an_engine_bug_mid_stream_is_internal_and_counted_500() -> None:
    core = core_of(FakeEngine(chunks("a", "b"), error=KeyError("oops")))
    seen: list[EngineOutput] = []
    with pytest.raises(RequestFailed) as caught:
        life = serve_request(core, Endpoint.CHAT, b"{}", envelope())
        async with contextlib.aclosing(life) as outputs:
            async for output in outputs:
                seen.append(output)
    assert len(seen) == 2
    assert caught.value.code is grpc.StatusCode.INTERNAL
    assert caught.value.error == inference_pb2.RequestError(
        grpc_code=grpc.StatusCode.INTERNAL.value[0], message="the engine failed unexpectedly"
    )
    assert core.load.stats.by_status == {500: 1}
    assert core.load.in_flight == 0


async def test_a_consumer_that_stops_early_closes_the_engine_and_counts_cancelled() -> None:
    engine = FakeEngine(chunks("a", "b", "c"))
    core = core_of(engine)
    life = serve_request(core, Endpoint.CHAT, b"{}", envelope())
    async with contextlib.aclosing(life) as outputs:
        async for _ in outputs:
            break
    await settle()
    assert engine.pulled == 1
    assert engine.closed == 1  # the engine's request was aborted, not left running
    assert engine.running == 0
    assert core.load.stats.by_status == {CANCELLED: 1}
    assert core.load.stats.errors == 0  # the client leaving is no error
    assert core.load.in_flight == 0


async def test_a_cancelled_task_cancels_the_engine_and_counts_cancelled() -> None:
    engine = FakeEngine(chunks("a"), hang=True)
    core = core_of(engine)
    task = asyncio.create_task(drain(core))
    await engine.started.wait()
    await settle()
    assert core.load.in_flight == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.cancelled == 1
    assert engine.running == 0
    assert core.load.stats.by_status == {CANCELLED: 1}
    assert core.load.in_flight == 0


async def test_queue_full_is_429() -> None:
    engine = FakeEngine(hang=True)
    core = core_of(engine, QueueLimits(max_concurrency=1, max_queue_size=0))
    holder = asyncio.create_task(drain(core))
    await engine.started.wait()
    with pytest.raises(RequestFailed) as caught:
        await drain(core)
    error = caught.value.error
    assert (error.http_status, caught.value.code) == (429, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert orjson.loads(error.error_body)["code"] == "queue_full"
    assert len(engine.calls) == 1  # the refused request never reached the engine
    assert core.load.stats.by_status == {429: 1}
    holder.cancel()
    with pytest.raises(asyncio.CancelledError):
        await holder
    assert core.load.stats.by_status == {429: 1, CANCELLED: 1}
    assert (core.load.in_flight, core.load.queued) == (0, 0)


async def test_queue_timeout_is_504() -> None:
    engine = FakeEngine(hang=True)
    core = core_of(engine, QueueLimits(max_concurrency=1, max_queue_size=1, timeout_s=0.05))
    holder = asyncio.create_task(drain(core))
    await engine.started.wait()
    with pytest.raises(RequestFailed) as caught:
        await drain(core)
    assert caught.value.error.http_status == 504
    assert caught.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert orjson.loads(caught.value.error.error_body)["code"] == "queue_timeout"
    assert core.load.queued == 0
    holder.cancel()
    with pytest.raises(asyncio.CancelledError):
        await holder
    assert core.load.in_flight == 0


# ---------------------------------------------------------------- Multiplex


class FacadeEnd:
    """The facade's half of one Multiplex stream, played by the test: what it
    sends goes through an asyncio.Queue, what the session answers is pumped
    into `frames` (a pump, so waiting for a frame never cancels the stream)."""

    def __init__(self, session: MultiplexSession):
        self._requests: asyncio.Queue[inference_pb2.MultiplexRequest | None] = asyncio.Queue()
        self._responses = session.serve(self._outgoing())
        self.frames: list[inference_pb2.MultiplexFrame] = []
        self.responses = 0
        self._arrived = asyncio.Event()
        self._pump = asyncio.create_task(self._read())

    async def _outgoing(self) -> AsyncIterator[inference_pb2.MultiplexRequest]:
        while (request := await self._requests.get()) is not None:
            yield request

    async def _read(self) -> None:
        async for response in self._responses:
            self.responses += 1
            self.frames.extend(response.frames)
            self._arrived.set()

    def open(self, stream_id: int, window_bytes: int = 0, kind: int = CHAT) -> None:
        self.send(
            opens=[
                inference_pb2.MultiplexOpen(
                    stream_id=stream_id,
                    kind=kind,  # type: ignore[arg-type]
                    envelope=envelope(request_id=f"req-{stream_id}"),
                    body=b"{}",
                    window_bytes=window_bytes,
                )
            ]
        )

    def send(self, **fields: Any) -> None:
        self._requests.put_nowait(inference_pb2.MultiplexRequest(**fields))

    def close_requests(self) -> None:
        """The facade half-closes the stream (no more opens)."""
        self._requests.put_nowait(None)

    def of(self, stream_id: int) -> list[inference_pb2.MultiplexFrame]:
        return [f for f in self.frames if f.stream_id == stream_id]

    async def until(self, stream_id: int, count: int, timeout_s: float = 2.0) -> None:
        async with asyncio.timeout(timeout_s):
            while len(self.of(stream_id)) < count:
                self._arrived.clear()
                await self._arrived.wait()

    async def ended(self, *stream_ids: int) -> None:
        async with asyncio.timeout(2.0):
            while not all(any(f.end for f in self.of(s)) for s in stream_ids):
                self._arrived.clear()
                await self._arrived.wait()

    async def close(self) -> None:
        """The stream goes away (the facade's call was cancelled)."""
        self._pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._pump
        await self._responses.aclose()  # type: ignore[attr-defined]


@contextlib.asynccontextmanager
async def multiplex(core: AgentCore) -> AsyncIterator[FacadeEnd]:
    end = FacadeEnd(MultiplexSession(core))
    try:
        yield end
    finally:
        await end.close()


def texts(frames: list[inference_pb2.MultiplexFrame]) -> list[bytes]:
    return [c for f in frames for c in f.chunks]


async def test_two_requests_share_one_stream() -> None:
    engine = FakeEngine(chunks("a", "b"), delay_s=0.01)
    core = core_of(engine)
    async with multiplex(core) as facade:
        facade.send(
            opens=[
                inference_pb2.MultiplexOpen(stream_id=s, kind=CHAT, envelope=envelope(), body=b"{}")
                for s in (1, 2)
            ]
        )
        await facade.ended(1, 2)
        for sid in (1, 2):
            frames = facade.of(sid)
            assert texts(frames) == [b"a", b"b"]
            assert [f.end for f in frames] == [False, False, True]
            assert not frames[-1].HasField("error")
        assert len(engine.calls) == 2
    assert core.load.stats.by_status == {200: 2}
    assert core.load.in_flight == 0


async def test_usage_travels_in_the_frame() -> None:
    usage = Usage(prompt_tokens=3, completion_tokens=5, total_tokens=8)
    async with multiplex(core_of(FakeEngine([EngineOutput([b"{}"], usage)]))) as facade:
        facade.open(1)
        await facade.ended(1)
        first = facade.of(1)[0]
        assert (first.usage.prompt_tokens, first.usage.completion_tokens) == (3, 5)
        assert first.usage.total_tokens == 8


async def test_engine_error_is_the_last_frame() -> None:
    engine = FakeEngine(chunks("a"), error=EngineError(400, "bad temperature", ENGINE_BODY))
    core = core_of(engine)
    async with multiplex(core) as facade:
        facade.open(1)
        await facade.ended(1)
        frames = facade.of(1)
        assert len(frames) == 2
        assert texts(frames) == [b"a"]
        last = frames[-1]
        assert last.end
        assert last.error == inference_pb2.RequestError(
            grpc_code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
            message="bad temperature",
            http_status=400,
            error_body=ENGINE_BODY,
        )
    assert core.load.stats.by_status == {400: 1}


async def test_draining_agent_fails_the_open_with_unavailable() -> None:
    engine = FakeEngine(chunks("a"))
    async with multiplex(core_of(engine, draining=True)) as facade:
        facade.open(1)
        await facade.ended(1)
        (frame,) = facade.of(1)
        assert frame.end
        assert frame.error.grpc_code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert frame.error.http_status == 0  # the agent's failure, not an engine's
    assert engine.calls == []


async def test_unknown_kind_is_invalid_argument() -> None:
    engine = FakeEngine(chunks("a"))
    async with multiplex(core_of(engine)) as facade:
        facade.open(1, kind=99)
        await facade.ended(1)
        (frame,) = facade.of(1)
        assert frame.error == inference_pb2.RequestError(
            grpc_code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message="unknown kind 99"
        )
    assert engine.calls == []


@pytest.mark.parametrize("kind", [99, inference_pb2.INFERENCE_KIND_UNSPECIFIED])
async def test_the_generic_rpc_refuses_an_unknown_kind(kind: int) -> None:
    engine = FakeEngine(chunks("a"))
    context = FakeServicerContext()
    request = inference_pb2.InferenceRequest(kind=kind, envelope=envelope(), body=b"{}")  # type: ignore[arg-type]
    with pytest.raises(FakeServicerContext.Aborted):
        async for _ in InferenceServicer(engine, Load()).Inference(request, context):  # type: ignore[arg-type]
            pass
    assert context.aborted == (grpc.StatusCode.INVALID_ARGUMENT, f"unknown kind {kind}")
    assert engine.calls == []


async def test_the_generic_rpc_serves_a_kind_with_its_content_type() -> None:
    engine = FakeEngine(chunks('{"text":"ok"}'))
    request = inference_pb2.InferenceRequest(
        kind=inference_pb2.INFERENCE_KIND_TRANSLATION,
        envelope=envelope(stream=False, request_id="req-7"),
        body=b"--b\r\n...",
        content_type="multipart/form-data; boundary=b",
    )
    servicer = InferenceServicer(engine, Load())
    messages = [m async for m in servicer.Inference(request, FakeServicerContext())]  # type: ignore[arg-type]
    assert [list(m.chunks) for m in messages] == [[b'{"text":"ok"}']]
    assert engine.requests == [
        EngineRequest(
            Endpoint.TRANSLATIONS, b"--b\r\n...", False, "req-7",
            "multipart/form-data; boundary=b",
        )
    ]  # fmt: skip


async def test_cancel_stops_the_engine_request_and_only_that_one() -> None:
    engine = FakeEngine(chunks("a"), hang=True)
    core = core_of(engine)
    async with multiplex(core) as facade:
        facade.open(1)
        facade.open(2)
        await facade.until(1, 1)
        await facade.until(2, 1)
        assert core.load.in_flight == 2
        facade.send(cancels=[inference_pb2.MultiplexCancel(stream_id=1)])
        await settle()
        assert engine.cancelled == 1
        assert engine.running == 1
        assert core.load.in_flight == 1
        assert core.load.stats.by_status == {CANCELLED: 1}
        # The facade ends a cancelled request itself: the agent sends nothing more for it.
        assert [f.end for f in facade.of(1)] == [False]
        assert [f.end for f in facade.of(2)] == [False]


async def test_the_stream_going_away_cancels_every_request() -> None:
    engine = FakeEngine(chunks("a"), hang=True)
    core = core_of(engine)
    facade = FacadeEnd(MultiplexSession(core))
    facade.open(1)
    facade.open(2)
    await facade.until(2, 1)
    await facade.close()
    await settle()
    assert engine.cancelled == 2
    assert engine.running == 0
    assert core.load.stats.by_status == {CANCELLED: 2}
    assert core.load.in_flight == 0


async def test_the_stream_ends_once_the_facade_closed_and_requests_finished() -> None:
    core = core_of(FakeEngine(chunks("a"), delay_s=0.02))
    facade = FacadeEnd(MultiplexSession(core))
    facade.open(1)
    facade.close_requests()
    async with asyncio.timeout(2.0):
        await facade._pump  # serve() returns on its own
    assert [f.end for f in facade.of(1)] == [False, True]
    assert core.load.stats.by_status == {200: 1}


async def test_window_stops_pulling_from_the_engine_until_credit() -> None:
    sixty = "x" * 60
    engine = FakeEngine(chunks(*[sixty] * 5))
    core = core_of(engine)
    async with multiplex(core) as facade:
        facade.open(1, window_bytes=100)
        await facade.until(1, 2)
        await asyncio.sleep(0.05)
        # 120 bytes sent of a 100-byte window: the third output is not even pulled.
        assert len(facade.of(1)) == 2
        assert engine.pulled == 2
        facade.send(credits=[inference_pb2.MultiplexCredit(stream_id=1, bytes=60)])
        await facade.until(1, 3)
        await asyncio.sleep(0.05)
        assert len(facade.of(1)) == 3  # 60 granted: exactly one more 60-byte frame
        assert engine.pulled == 3
        facade.send(credits=[inference_pb2.MultiplexCredit(stream_id=1, bytes=10_000)])
        await facade.ended(1)
        assert texts(facade.of(1)) == [sixty.encode()] * 5
        assert facade.of(1)[-1].end
    assert core.load.stats.by_status == {200: 1}


async def test_credit_for_an_unknown_stream_is_ignored() -> None:
    async with multiplex(core_of(FakeEngine(chunks("a")))) as facade:
        facade.send(credits=[inference_pb2.MultiplexCredit(stream_id=42, bytes=10)])
        facade.open(1, window_bytes=100)
        await facade.ended(1)
        assert texts(facade.of(1)) == [b"a"]


async def test_window_zero_means_no_flow_control() -> None:
    engine = FakeEngine(chunks(*["x" * 60] * 5))
    async with multiplex(core_of(engine)) as facade:
        facade.open(1, window_bytes=0)
        await facade.ended(1)
        assert len(facade.of(1)) == 6
        assert engine.pulled == 5


async def test_cancel_while_waiting_for_credit_ends_the_engine_request() -> None:
    engine = FakeEngine(chunks(*["x" * 60] * 5))
    core = core_of(engine)
    async with multiplex(core) as facade:
        facade.open(1, window_bytes=60)
        await facade.until(1, 1)
        await settle()
        assert engine.running == 1  # parked at the window, the engine request still open
        facade.send(cancels=[inference_pb2.MultiplexCancel(stream_id=1)])
        await settle()
        assert engine.running == 0
        assert engine.closed == 1
        assert engine.pulled == 1
        assert core.load.stats.by_status == {CANCELLED: 1}
        assert core.load.in_flight == 0


# ---------------------------------------------------------------- one RequestError


class FakeServicerContext:
    """The grpc.aio.ServicerContext seam of the per-call handlers: records the
    trailing metadata and the abort, and raises on abort as grpc does."""

    class Aborted(Exception):
        pass

    def __init__(self) -> None:
        self.trailing_metadata: tuple[tuple[str, bytes], ...] = ()
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def set_trailing_metadata(self, metadata: tuple[tuple[str, bytes], ...]) -> None:
        self.trailing_metadata = metadata

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self.aborted = (code, details)
        raise self.Aborted(details)


class FakeFailedCall:
    """A per-call gRPC call, as the facade reads it, that failed the way the
    agent's servicer ended it (its code, details and trailing metadata)."""

    def __init__(self, context: FakeServicerContext):
        assert context.aborted is not None
        code, details = context.aborted
        self._error = grpc.aio.AioRpcError(
            code,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(*context.trailing_metadata),
            details,
            None,
        )

    def __aiter__(self) -> FakeFailedCall:
        return self

    async def __anext__(self) -> Any:
        raise self._error

    def cancel(self) -> None:
        pass


class FakeAgentSession:
    """The AgentSession seam of MultiplexExchange (grants and cancels only)."""

    def grant(self, stream_id: int, nbytes: int) -> None:
        pass

    def cancel(self, stream_id: int) -> None:
        pass


@pytest.mark.parametrize(
    "error",
    [
        EngineError(400, "bad temperature", ENGINE_BODY),
        EngineError(429, "engine busy"),
        RuntimeError("engine bug"),
    ],
    ids=["engine-400", "engine-429", "engine-bug"],
)
async def test_both_transports_carry_the_same_request_error(error: BaseException) -> None:
    # Per call: the servicer's handler, as grpc would run it.
    per_call_engine = FakeEngine(chunks("a"), error=error)
    servicer = InferenceServicer(per_call_engine, Load())
    context = FakeServicerContext()
    request = inference_pb2.ChatCompletionRequest(envelope=envelope(), body=b"{}")
    messages: list[inference_pb2.ChatCompletionResponse] = []
    with pytest.raises(FakeServicerContext.Aborted):
        async for message in servicer.ChatCompletion(request, context):  # type: ignore[arg-type]
            messages.append(message)
    assert [list(m.chunks) for m in messages] == [[b"a"]]
    ((key, value),) = context.trailing_metadata
    assert key == ERROR_METADATA_KEY == FACADE_ERROR_KEY
    per_call = inference_pb2.RequestError.FromString(value)

    # Multiplexed: the same engine failure.
    async with multiplex(core_of(FakeEngine(chunks("a"), error=error))) as facade:
        facade.open(1)
        await facade.ended(1)
        multiplexed = facade.of(1)[-1].error

    assert per_call == multiplexed
    assert context.aborted is not None
    assert context.aborted[0].value[0] == per_call.grpc_code
    assert context.aborted[1] == per_call.message

    # And the facade makes one answer of either.
    with pytest.raises(AgentFailure) as from_call:
        async for _ in PerCallExchange(FakeFailedCall(context), "m", generic=False).chunks():
            pass
    exchange = MultiplexExchange(FakeAgentSession(), 1, "m")  # type: ignore[arg-type]
    exchange.frames.put(inference_pb2.MultiplexFrame(stream_id=1, end=True, error=multiplexed))
    with pytest.raises(AgentFailure) as from_stream:
        async for _ in exchange.chunks():
            pass
    assert from_call.value.error == from_stream.value.error
    assert from_call.value.code is from_stream.value.code
    assert from_call.value.engine_error == from_stream.value.engine_error
