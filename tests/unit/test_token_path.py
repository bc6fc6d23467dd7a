"""The facade's token path in process (facade/proxy.py, facade/response.py,
facade/exchange.py): raw ASGI driven by list-backed receive/send (tests/asgi.py),
the route table filled as the controller fills it, and the agent replaced at
one seam: a FakeExchange behind the proxy's opener, or (the last tests) a real
MultiplexSession behind a fake gRPC channel, so the whole path from ASGI to the
engine seam runs with no sockets. Every case asserts the exact ASGI messages."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from typing import Any

import grpc
import orjson
import pytest

from facade import exchange as exchange_module
from facade import response as response_module
from facade.app import FacadeApp
from facade.auth import KeyChecker
from facade.endpoints import KINDS
from facade.errors import AgentFailure, ApiError, failure
from facade.proxy import InferenceProxy
from facade.response import ResponseWriter
from facade.routing import RouteTable, Target
from facade.settings import FacadeSettings
from kscope.v1 import control_pb2, inference_pb2
from kscope_common.request_stats import CANCELLED
from node_agent import local_agents
from node_agent.engines.base import Endpoint, EngineError, EngineOutput, EngineRequest
from node_agent.load import Load
from node_agent.multiplex import MultiplexSession
from node_agent.servicer import InferenceServicer
from tests.asgi import REQUEST_ID, ClientReceive, ClientSend, http_scope
from tests.unit.test_request_life import FakeEngine, FakeServicerContext, chunks

pytestmark = pytest.mark.timeout(10)

CHAT = KINDS["/v1/chat/completions"]
EMBEDDINGS = KINDS["/v1/embeddings"]
STREAM_BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}'
UNARY_BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
JSON_HEADERS = [(b"content-type", b"application/json")]
DONE = b"data: [DONE]\n\n"
ENGINE_BODY = b'{"message":"bad temperature","type":"BadRequestError","param":null,"code":400}'


def bare_start(status: int, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """A response start as a ResponseWriter used on its own sends it."""
    return {"type": "http.response.start", "status": status, "headers": headers}


def start(status: int, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """A response start with `headers`, and the request's id after the content headers."""
    base = len(SSE_HEADERS) if headers[: len(SSE_HEADERS)] == SSE_HEADERS else len(JSON_HEADERS)
    headers = [*headers[:base], (b"x-request-id", REQUEST_ID), *headers[base:]]
    return {"type": "http.response.start", "status": status, "headers": headers}


def event(*payloads: bytes) -> dict[str, Any]:
    body = b"".join(b"data: " + p + b"\n\n" for p in payloads)
    return {"type": "http.response.body", "body": body, "more_body": True}


def last(body: bytes) -> dict[str, Any]:
    return {"type": "http.response.body", "body": body}


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    error = {"message": message, "type": type_, "param": param, "code": code}
    return b'{"error":' + orjson.dumps(error) + b"}"


def sse_error(body: bytes) -> dict[str, Any]:
    """The last message of a stream that failed after it began."""
    return last(b"data: " + body + b"\n\n" + DONE)


# ---------------------------------------------------------------- seams


class FakeChannel:
    """The grpc.aio.Channel seam of RouteTable.dial. Stubs are built on it; its
    calls go to `agent` (in process), and without one any call fails the test."""

    def __init__(self, agent: Agent | None = None):
        self._agent = agent
        self.closed = False

    def _unexpected(self, path: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"unexpected gRPC call {path}")

        return call

    def unary_unary(self, path: str, **_: Any) -> Callable[..., Any]:
        return self._unexpected(path)

    stream_unary = unary_unary

    def unary_stream(self, path: str, **options: Any) -> Callable[..., Any]:
        agent = self._agent
        if agent is None:
            return self._unexpected(path)
        method = path.rsplit("/", 1)[1]

        def call(request: Any, timeout: float | None = None) -> InProcessStreamCall:
            return agent.per_call(method, request, **options)

        return call

    def stream_stream(self, path: str, **options: Any) -> Callable[..., Any]:
        agent = self._agent
        if agent is None:
            return self._unexpected(path)

        def call(requests: Any) -> InProcessMultiplexCall:
            return agent.multiplex(requests, **options)

        return call

    async def close(self, grace: float | None) -> None:
        self.closed = True


class FakeRouteWatcher:
    """The RouteWatcher seam: the proxy asks it only for cold starts."""

    def __init__(self) -> None:
        self.ensured: list[str] = []

    async def ensure_model(self, model: str, timeout_s: float) -> None:
        self.ensured.append(model)
        return None


HANG = "hang"
"""A FakeExchange step: nothing more arrives, ever (until cancelled)."""

Step = Sequence[bytes] | float | AgentFailure | str


class FakeExchange:
    """The Exchange seam: plays a script of steps (a chunk list to yield, a pause
    in seconds, an AgentFailure to raise, or HANG). `cancel()` ends it the way
    MultiplexExchange does: its chunks() raises AgentFailure(CANCELLED)."""

    def __init__(self, *script: Step):
        self._script = script
        self._cancelled = asyncio.Event()
        self.cancels = 0
        self.consumed_bytes: list[int] = []
        self.usage: inference_pb2.Usage | None = None
        self.content_type = ""

    async def chunks(self) -> AsyncGenerator[Sequence[bytes], None]:
        for step in self._script:
            if isinstance(step, AgentFailure):
                raise step
            if isinstance(step, float) or step == HANG:
                timeout = step if isinstance(step, float) else None
                try:
                    await asyncio.wait_for(self._cancelled.wait(), timeout)
                except TimeoutError:
                    continue
                raise cancelled("m")
            if self._cancelled.is_set():
                raise cancelled("m")
            yield step  # type: ignore[misc]

    def consumed(self, chunks: Sequence[bytes]) -> None:
        self.consumed_bytes.append(sum(len(c) for c in chunks))

    def cancel(self) -> None:
        self.cancels += 1
        self._cancelled.set()


class FakeOpener:
    """The proxy's Opener seam: hands out the given exchanges in order and
    records each open (the target and what the proxy asked for)."""

    def __init__(self, *exchanges: FakeExchange):
        self.exchanges = list(exchanges)
        self.opened: list[tuple[str, int, str, float | None]] = []
        self.requests: list[Any] = []

    def __call__(
        self, target: Target, kind: int, request: Any, model: str, rpc: str, timeout_s: float | None
    ) -> FakeExchange:
        self.opened.append((target.instance_id, kind, rpc, timeout_s))
        self.requests.append(request)
        return self.exchanges[len(self.opened) - 1]

    @property
    def targets(self) -> list[str]:
        return [opened[0] for opened in self.opened]


def agent_failure(code: grpc.StatusCode, message: str, **engine: Any) -> AgentFailure:
    error = inference_pb2.RequestError(grpc_code=code.value[0], message=message, **engine)
    return failure(error, "m")


def cancelled(model: str) -> AgentFailure:
    return failure(
        inference_pb2.RequestError(grpc_code=grpc.StatusCode.CANCELLED.value[0], message="x"),
        model,
    )


def unreachable() -> AgentFailure:
    return agent_failure(grpc.StatusCode.UNAVAILABLE, "connection refused")


def route_update(instances: int = 1, cold: tuple[str, ...] = ()) -> control_pb2.WatchRoutesResponse:
    """One READY model 'm' with `instances` endpoints, as the controller pushes
    it (and the `cold` models, with none)."""
    return control_pb2.WatchRoutesResponse(
        version=1,
        routes=[
            *(
                control_pb2.ModelRoute(
                    model=control_pb2.Model(name=name, state=control_pb2.MODEL_STATE_COLD)
                )
                for name in cold
            ),
            control_pb2.ModelRoute(
                model=control_pb2.Model(
                    name="m",
                    state=control_pb2.MODEL_STATE_READY,
                    state_message="ready",
                    ready_replicas=instances,
                    live_replicas=instances,
                ),
                endpoints=[
                    control_pb2.Endpoint(instance_id=f"i-{n}", address=f"10.0.0.{n}:7000")
                    for n in range(1, instances + 1)
                ],
            ),
        ],
    )


def gateway(
    *exchanges: FakeExchange, instances: int = 1, cold: tuple[str, ...] = (), **settings: Any
) -> tuple[InferenceProxy, FakeOpener, RouteTable]:
    table = RouteTable(dial=lambda address, instance_id: FakeChannel())  # type: ignore[arg-type,return-value]
    table.apply(route_update(instances, cold))
    config = FacadeSettings(controller="127.0.0.1:1", require_key=False, **settings)
    proxy = InferenceProxy(config, table, FakeRouteWatcher())  # type: ignore[arg-type]
    opener = FakeOpener(*exchanges)
    proxy._open = opener
    return proxy, opener, table


async def call(
    proxy: InferenceProxy,
    body: bytes = STREAM_BODY,
    *,
    path: str = "/v1/chat/completions",
    receive: ClientReceive | None = None,
    send: ClientSend | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
    content_type: bytes = b"",
) -> ClientSend:
    send = send or ClientSend()
    await proxy(
        scope_of(path, headers, content_type), receive or ClientReceive(body), send, KINDS[path]
    )
    return send


def scope_of(
    path: str, headers: list[tuple[bytes, bytes]] | None = None, content_type: bytes = b""
) -> dict[str, Any]:
    """A POST's scope; `content_type` replaces the JSON one."""
    scope = http_scope(path, headers)
    if content_type:
        scope["headers"] = [
            (name, content_type if name == b"content-type" else value)
            for name, value in scope["headers"]
        ]
    return scope


def statuses(proxy: InferenceProxy, model: str = "m") -> dict[int, int]:
    return dict(proxy.stats.of(model).by_status)


# ---------------------------------------------------------------- answers


async def test_a_stream_is_forwarded_event_by_event() -> None:
    exchange = FakeExchange([b'{"a":1}'], [b'{"b":2}', b'{"c":3}'])
    proxy, opener, table = gateway(exchange)
    sent = await call(proxy)
    assert sent.messages == [
        start(200, SSE_HEADERS),
        event(b'{"a":1}'),
        event(b'{"b":2}', b'{"c":3}'),
        last(DONE),
    ]
    assert opener.opened == [
        ("i-1", inference_pb2.INFERENCE_KIND_CHAT_COMPLETION, "ChatCompletion", 600.0)
    ]
    (request,) = opener.requests
    assert isinstance(request, inference_pb2.ChatCompletionRequest)
    assert request.body == STREAM_BODY  # the client's body, unchanged
    assert (request.envelope.model, request.envelope.stream) == ("m", True)
    assert request.envelope.request_id.startswith("req-")
    assert exchange.consumed_bytes == [7, 14]  # what reached the client, per write
    assert exchange.cancels == 1  # always released at the end
    assert statuses(proxy) == {200: 1}
    assert proxy.stats.of("m").ttft.count == 1
    assert proxy.stream_chunks == 3
    assert table.models["m"].targets[0].outstanding == 0


async def test_a_unary_answer_is_one_json_body() -> None:
    exchange = FakeExchange([b'{"id":"cmpl-1",', b'"object":"chat.completion"}'])
    proxy, opener, _ = gateway(exchange)
    sent = await call(proxy, UNARY_BODY)
    assert sent.messages == [
        start(200, JSON_HEADERS),
        last(b'{"id":"cmpl-1","object":"chat.completion"}'),
    ]
    assert opener.requests[0].envelope.stream is False
    assert statuses(proxy) == {200: 1}
    assert proxy.stats.of("m").ttft.count == 0


async def test_embeddings_go_through_their_own_rpc() -> None:
    proxy, opener, _ = gateway(FakeExchange([b'{"data":[]}']))
    sent = await call(proxy, b'{"model":"m","input":"hi"}', path="/v1/embeddings")
    assert sent.messages == [start(200, JSON_HEADERS), last(b'{"data":[]}')]
    assert opener.opened[0][1:3] == (inference_pb2.INFERENCE_KIND_EMBEDDING, "Embedding")
    assert isinstance(opener.requests[0], inference_pb2.EmbeddingRequest)


# ---------------------------------------------------------------- failures


async def test_engine_error_before_the_first_chunk_is_an_http_error() -> None:
    engine_400 = agent_failure(
        grpc.StatusCode.INVALID_ARGUMENT, "bad temperature", http_status=400, error_body=ENGINE_BODY
    )
    proxy, opener, _ = gateway(FakeExchange(engine_400), instances=2)
    sent = await call(proxy)
    assert sent.messages == [start(400, JSON_HEADERS), last(b'{"error":' + ENGINE_BODY + b"}")]
    assert opener.targets == ["i-1"]  # the engine's answer: no other instance is tried
    assert statuses(proxy) == {400: 1}


async def test_failure_after_the_first_chunk_is_an_sse_error_then_done() -> None:
    bug = agent_failure(grpc.StatusCode.INTERNAL, "the engine failed unexpectedly")
    proxy, _, _ = gateway(FakeExchange([b'{"a":1}'], bug))
    sent = await call(proxy)
    assert sent.messages == [
        start(200, SSE_HEADERS),
        event(b'{"a":1}'),
        sse_error(error_body("the engine failed unexpectedly", "upstream_error", None)),
    ]
    assert statuses(proxy) == {502: 1}  # HTTP said 200; the request did not succeed
    assert proxy.stats.of("m").errors == 1
    assert proxy.stats.of("m").ttft.count == 0


async def test_stream_idle_timeout_ends_with_a_timeout_event() -> None:
    exchange = FakeExchange([b'{"a":1}'], [b'{"b":2}'], HANG)
    proxy, _, _ = gateway(exchange, stream_idle_timeout_s=0.2)
    began = time.monotonic()
    sent = await call(proxy)
    took = time.monotonic() - began
    assert sent.messages == [
        start(200, SSE_HEADERS),
        event(b'{"a":1}'),
        event(b'{"b":2}'),
        sse_error(
            error_body(
                "the request for 'm' sent nothing for 0.2 s", "timeout_error", "stream_idle_timeout"
            )
        ),
    ]
    # Cut between idle and idle + a quarter of it (the timer moves in steps).
    assert 0.2 <= took < 0.4
    assert exchange.cancels == 1
    assert statuses(proxy) == {504: 1}


async def test_before_the_first_chunk_only_the_cap_counts() -> None:
    # A queued request may wait longer than the idle timeout: only the cap applies.
    exchange = FakeExchange(HANG)
    proxy, _, _ = gateway(exchange, stream_idle_timeout_s=0.05, request_timeout_s=0.25)
    began = time.monotonic()
    sent = await call(proxy)
    took = time.monotonic() - began
    assert sent.messages == [
        start(504, JSON_HEADERS),
        last(
            error_body(
                "the request for 'm' took longer than 0.25 s", "timeout_error", "request_timeout"
            )
        ),
    ]
    assert 0.25 <= took < 0.4
    assert exchange.cancels == 1
    assert statuses(proxy) == {504: 1}


async def test_total_cap_ends_a_steady_stream() -> None:
    steady: list[Step] = []
    for _ in range(100):
        steady += [[b'{"t":1}'], 0.05]
    exchange = FakeExchange(*steady)
    proxy, opener, _ = gateway(exchange, request_timeout_s=0.3, stream_idle_timeout_s=0.2)
    began = time.monotonic()
    sent = await call(proxy)
    took = time.monotonic() - began
    assert opener.opened[0][3] == 0.3  # the agent gets the same deadline
    assert sent.messages[0] == start(200, SSE_HEADERS)
    middle = sent.messages[1:-1]
    assert 4 <= len(middle) <= 7
    assert all(m == event(b'{"t":1}') for m in middle)
    assert sent.messages[-1] == sse_error(
        error_body("the request for 'm' took longer than 0.3 s", "timeout_error", "request_timeout")
    )
    assert 0.3 <= took < 0.45
    assert exchange.cancels == 1
    assert statuses(proxy) == {504: 1}


async def test_total_cap_on_a_unary_request_is_an_http_504() -> None:
    proxy, _, _ = gateway(FakeExchange(HANG), request_timeout_s=0.1)
    sent = await call(proxy, UNARY_BODY)
    assert sent.messages == [
        start(504, JSON_HEADERS),
        last(
            error_body(
                "the request for 'm' took longer than 0.1 s", "timeout_error", "request_timeout"
            )
        ),
    ]
    assert statuses(proxy) == {504: 1}


async def test_client_disconnect_cancels_the_exchange_and_sends_nothing_more() -> None:
    exchange = FakeExchange([b'{"a":1}'], HANG)
    proxy, _, table = gateway(exchange)
    receive, send = ClientReceive(STREAM_BODY), ClientSend()
    task = asyncio.create_task(call(proxy, receive=receive, send=send))
    await send.wait_for(2)
    receive.disconnect()
    async with asyncio.timeout(1.0):
        await task
    assert send.messages == [start(200, SSE_HEADERS), event(b'{"a":1}')]
    assert exchange.cancels >= 1
    assert exchange.consumed_bytes == [7]
    assert statuses(proxy) == {CANCELLED: 1}
    assert proxy.stats.of("m").errors == 0
    assert table.models["m"].targets[0].outstanding == 0


async def test_client_disconnect_before_any_chunk_sends_nothing() -> None:
    exchange = FakeExchange(HANG)
    proxy, _, _ = gateway(exchange)
    receive, send = ClientReceive(STREAM_BODY), ClientSend()
    task = asyncio.create_task(call(proxy, receive=receive, send=send))
    for _ in range(10):
        await asyncio.sleep(0)
    receive.disconnect()
    async with asyncio.timeout(1.0):
        await task
    assert send.messages == []
    assert exchange.cancels >= 1
    assert statuses(proxy) == {CANCELLED: 1}


async def test_client_gone_while_sending_its_body() -> None:
    proxy, opener, _ = gateway()
    receive = ClientReceive(b'{"model":"m",', complete=False)
    receive.disconnect()
    sent = await call(proxy, receive=receive)
    assert sent.messages == []
    assert opener.opened == []
    assert statuses(proxy, "") == {CANCELLED: 1}


async def test_a_client_that_stops_reading_is_cut_at_the_idle_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(response_module, "LAST_WORDS_TIMEOUT_S", 0.05)
    steady: list[Step] = [[b'{"t":1}'], 0.01] * 1000
    exchange = FakeExchange(*steady)
    proxy, _, _ = gateway(exchange, stream_idle_timeout_s=0.2)
    send = ClientSend()
    send.stall(after=2)  # it read the headers and one event, then no more
    began = time.monotonic()
    async with asyncio.timeout(1.0):
        await call(proxy, send=send)
    took = time.monotonic() - began
    assert 0.2 <= took < 0.45  # idle + a step, then the last words' limit
    assert send.messages == [start(200, SSE_HEADERS), event(b'{"t":1}')]
    assert exchange.consumed_bytes == [7]  # what it did not read is not granted back
    assert exchange.cancels == 1
    assert statuses(proxy) == {504: 1}


# ---------------------------------------------------------------- refused at the door


@pytest.mark.parametrize(
    ("body", "message", "code", "param"),
    [
        (b"[]", "request body must be a JSON object", "invalid_json", None),
        (b'{"messages":[]}', "'model' is required and must be a non-empty string", None, "model"),
        (b'{"model":"m","messages":[],"stream":"yes"}', "'stream' must be a boolean", None,
         "stream"),
        (b'{"model":"m"}', "'messages' is required", None, "messages"),
        (b'{"model":"m","messages":"hi"}', "'messages' must be array", None, "messages"),
    ],
    ids=["not-object", "no-model", "stream-not-bool", "no-messages", "messages-not-array"],
)  # fmt: skip
async def test_bad_requests_are_400(
    body: bytes, message: str, code: str | None, param: str | None
) -> None:
    proxy, opener, _ = gateway(cold=("other",))  # two models: a request must name one
    sent = await call(proxy, body)
    assert sent.messages == [
        start(400, JSON_HEADERS),
        last(error_body(message, "invalid_request_error", code, param)),
    ]
    assert opener.opened == []


async def test_with_one_model_a_request_may_name_none() -> None:
    exchange = FakeExchange([b'{"a":1}'])
    proxy, opener, _ = gateway(exchange)
    sent = await call(proxy, b'{"messages":[],"stream":true}')
    assert sent.status == 200
    assert [r.envelope.model for r in opener.requests] == ["m"]


async def test_bad_json_is_400() -> None:
    proxy, opener, _ = gateway()
    sent = await call(proxy, b"{not json")
    assert sent.status == 400
    assert sent.headers == {**dict(JSON_HEADERS), b"x-request-id": REQUEST_ID}
    assert sent.ended and len(sent.messages) == 2
    error = orjson.loads(sent.body)["error"]
    assert error["message"].startswith("request body is not valid JSON: ")
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "invalid_json",
        None,
    )
    assert opener.opened == []
    assert statuses(proxy, "") == {400: 1}  # no model: not counted under one


async def test_embeddings_do_not_stream() -> None:
    proxy, _, _ = gateway()
    sent = await call(proxy, b'{"model":"m","input":"x","stream":true}', path="/v1/embeddings")
    assert sent.messages == [
        start(400, JSON_HEADERS),
        last(error_body("this endpoint does not stream", "invalid_request_error", None, "stream")),
    ]


TOO_LARGE = error_body(
    "request body is larger than 16 bytes", "invalid_request_error", "request_too_large"
)


async def test_a_declared_body_over_the_limit_is_413_unread() -> None:
    proxy, opener, _ = gateway(max_body_bytes=16)
    receive = ClientReceive(STREAM_BODY)
    sent = await call(proxy, receive=receive, headers=[(b"content-length", b"73")])
    assert sent.messages == [start(413, JSON_HEADERS), last(TOO_LARGE)]
    assert receive.calls == 0
    assert opener.opened == []


async def test_a_streamed_body_over_the_limit_is_413() -> None:
    proxy, opener, _ = gateway(max_body_bytes=16)
    receive = ClientReceive(b'{"model":"m",', b'"messages":[]}')
    sent = await call(proxy, receive=receive)
    assert sent.messages == [start(413, JSON_HEADERS), last(TOO_LARGE)]
    assert receive.calls == 2
    assert opener.opened == []
    assert statuses(proxy, "") == {413: 1}


async def test_an_unknown_model_is_404() -> None:
    proxy, opener, _ = gateway()
    sent = await call(proxy, b'{"model":"nope","messages":[]}')
    assert sent.messages == [
        start(404, JSON_HEADERS),
        last(
            error_body(
                "The model 'nope' does not exist. GET /v1/models lists the models.",
                "invalid_request_error",
                "model_not_found",
                "model",
            )
        ),
    ]
    assert opener.opened == []
    assert statuses(proxy, "") == {404: 1}  # a client's typo is no new series
    assert "nope" not in proxy.stats.models


# ---------------------------------------------------------------- retry on another instance


INSTANCE_UNAVAILABLE = error_body(
    "the instance serving 'm' is unavailable: connection refused",
    "service_unavailable_error",
    "instance_unavailable",
)


async def test_an_unreachable_instance_is_retried_once_on_another() -> None:
    first, second = FakeExchange(unreachable()), FakeExchange([b'{"a":1}'])
    proxy, opener, table = gateway(first, second, instances=2)
    sent = await call(proxy)
    assert opener.targets == ["i-1", "i-2"]
    assert sent.messages == [start(200, SSE_HEADERS), event(b'{"a":1}'), last(DONE)]
    assert (first.cancels, second.cancels) == (1, 1)
    one, two = table.models["m"].targets
    assert one.suspect_until > time.monotonic()  # avoided until the next table
    assert two.suspect_until == 0.0
    assert (one.outstanding, two.outstanding) == (0, 0)
    assert statuses(proxy) == {200: 1}


async def test_no_retry_once_the_answer_began() -> None:
    first = FakeExchange([b'{"a":1}'], unreachable())
    proxy, opener, _ = gateway(first, FakeExchange([b'{"b":2}']), instances=2)
    sent = await call(proxy)
    assert opener.targets == ["i-1"]
    assert sent.messages == [
        start(200, SSE_HEADERS),
        event(b'{"a":1}'),
        sse_error(INSTANCE_UNAVAILABLE),
    ]
    assert statuses(proxy) == {503: 1}


async def test_only_one_retry() -> None:
    proxy, opener, _ = gateway(
        FakeExchange(unreachable()), FakeExchange(unreachable()), instances=2
    )
    sent = await call(proxy)
    assert opener.targets == ["i-1", "i-2"]
    assert sent.messages == [
        start(503, [*JSON_HEADERS, (b"retry-after", b"1")]),
        last(INSTANCE_UNAVAILABLE),
    ]
    assert statuses(proxy) == {503: 1}


async def test_unreachable_with_no_other_instance_is_503_with_retry_after() -> None:
    proxy, opener, _ = gateway(FakeExchange(unreachable()), FakeExchange([b"x"]), instances=1)
    sent = await call(proxy)
    assert opener.targets == ["i-1"]
    assert sent.messages == [
        start(503, [*JSON_HEADERS, (b"retry-after", b"1")]),
        last(INSTANCE_UNAVAILABLE),
    ]


async def test_an_engine_503_is_not_a_transport_failure() -> None:
    engine_503 = agent_failure(
        grpc.StatusCode.UNAVAILABLE, "loading", http_status=503, error_body=b'{"message":"loading"}'
    )
    proxy, opener, _ = gateway(FakeExchange(engine_503), FakeExchange([b"x"]), instances=2)
    sent = await call(proxy)
    assert opener.targets == ["i-1"]
    assert sent.messages == [start(503, JSON_HEADERS), last(b'{"error":{"message":"loading"}}')]


# ---------------------------------------------------------------- ResponseWriter


async def test_writer_fail_before_start_is_an_http_error_with_retry_after() -> None:
    send = ClientSend()
    writer = ResponseWriter(send)
    before = response_module.ERRORS.get(503, 0)
    await writer.fail(ApiError(503, "busy", "service_unavailable_error", retry_after_s=7))
    assert send.messages == [
        bare_start(503, [*JSON_HEADERS, (b"retry-after", b"7")]),
        last(error_body("busy", "service_unavailable_error", None)),
    ]
    assert (writer.status, writer.started, writer.finished) == (503, False, True)
    assert response_module.ERRORS[503] == before + 1
    await writer.fail(ApiError(500, "again"))  # a request is answered once
    assert len(send.messages) == 2


async def test_writer_fail_after_start_is_an_sse_error_and_done() -> None:
    send = ClientSend()
    writer = ResponseWriter(send)
    await writer.events([b'{"a":1}'])
    await writer.fail(ApiError(429, "slow down", "rate_limit_error", retry_after_s=3))
    assert send.messages == [
        bare_start(200, SSE_HEADERS),
        event(b'{"a":1}'),
        sse_error(error_body("slow down", "rate_limit_error", None)),
    ]
    assert writer.status == 429
    assert writer.first_token_at > 0


async def test_writer_fail_gives_up_on_a_client_that_stopped_reading(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(response_module, "LAST_WORDS_TIMEOUT_S", 0.2)  # 1 s in production
    send = ClientSend()
    writer = ResponseWriter(send)
    await writer.events([b'{"a":1}'])
    send.stall()
    began = time.monotonic()
    await writer.fail(ApiError(504, "too slow", "timeout_error"))
    took = time.monotonic() - began
    assert 0.2 <= took < 0.4
    assert writer.status == 504
    assert send.messages == [bare_start(200, SSE_HEADERS), event(b'{"a":1}')]


async def test_writer_client_left_counts_cancelled() -> None:
    writer = ResponseWriter(ClientSend())
    await writer.begin_stream()
    writer.client_left()
    assert (writer.status, writer.finished) == (CANCELLED, True)


# ---------------------------------------------------------------- the whole path in process


_EOF = object()
"""The end of a call's messages."""


class InProcessStreamCall:
    """The per-call seam: a unary-stream call answered by the real servicer
    handler in this process (with a FakeServicerContext). Messages go through
    the stub's own (de)serializers, as on the wire, and the call ends as a
    grpc.aio call does: AioRpcError with the handler's code, details and
    trailing metadata when it aborted, and asyncio.CancelledError once
    `cancel()` was called (grpc/aio/_call.py raises it for a locally cancelled
    call; checked against a real channel)."""

    def __init__(
        self,
        handler: Callable[[Any, FakeServicerContext], AsyncIterator[Any]],
        request: Any,
        request_serializer: Callable[[Any], bytes],
        response_deserializer: Callable[[bytes], Any],
        **_: Any,
    ):
        wire_request = type(request).FromString(request_serializer(request))
        self._context = FakeServicerContext()
        self._items: asyncio.Queue[Any] = asyncio.Queue()
        self._cancelled = False
        self._pump = asyncio.create_task(
            self._serve(handler(wire_request, self._context), response_deserializer)
        )

    async def _serve(
        self, messages: AsyncIterator[Any], deserialize: Callable[[bytes], Any]
    ) -> None:
        try:
            async for message in messages:
                self._items.put_nowait(deserialize(message.SerializeToString()))
        except FakeServicerContext.Aborted:
            assert self._context.aborted is not None
            code, details = self._context.aborted
            trailing = grpc.aio.Metadata(*self._context.trailing_metadata)
            self._items.put_nowait(
                grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details, None)
            )
            return
        self._items.put_nowait(_EOF)

    def __aiter__(self) -> InProcessStreamCall:
        return self

    async def __anext__(self) -> Any:
        if self._cancelled:
            raise asyncio.CancelledError
        item = await self._items.get()
        if item is _EOF:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> bool:
        if self._cancelled or self._pump.done():
            return False
        self._cancelled = True
        self._pump.cancel()
        self._items.put_nowait(asyncio.CancelledError())  # wakes a pending read
        return True


class InProcessMultiplexCall:
    """The Multiplex call seam: what AgentSession reads and cancels, answered
    by a real MultiplexSession in this process. Messages go through the stub's
    own (de)serializers, as on the wire; a cancelled call ends its reader with
    CancelledError, as grpc.aio's does."""

    def __init__(
        self,
        session: MultiplexSession,
        requests: AsyncIterator[inference_pb2.MultiplexRequest],
        request_serializer: Callable[[Any], bytes],
        response_deserializer: Callable[[bytes], Any],
        **_: Any,
    ):
        self._responses: asyncio.Queue[inference_pb2.MultiplexResponse | None] = asyncio.Queue()
        self._cancelled = False
        wire = self._wire(requests, request_serializer)
        self._pump = asyncio.create_task(self._serve(session.serve(wire), response_deserializer))

    @staticmethod
    async def _wire(
        requests: AsyncIterator[inference_pb2.MultiplexRequest], serialize: Callable[[Any], bytes]
    ) -> AsyncIterator[inference_pb2.MultiplexRequest]:
        async for request in requests:
            yield inference_pb2.MultiplexRequest.FromString(serialize(request))

    async def _serve(
        self,
        responses: AsyncIterator[inference_pb2.MultiplexResponse],
        deserialize: Callable[[bytes], Any],
    ) -> None:
        try:
            async for response in responses:
                self._responses.put_nowait(deserialize(response.SerializeToString()))
        finally:
            self._responses.put_nowait(None)

    def __aiter__(self) -> InProcessMultiplexCall:
        return self

    async def __anext__(self) -> inference_pb2.MultiplexResponse:
        response = await self._responses.get()
        if response is None:
            if self._cancelled:
                raise asyncio.CancelledError
            raise StopAsyncIteration
        return response

    def cancel(self) -> bool:
        self._cancelled = True
        self._pump.cancel()
        return True


class Agent:
    """One agent in process: the real servicer, request life and Multiplex
    session over a FakeEngine, reached through FakeChannel."""

    def __init__(self, engine: FakeEngine):
        self.engine = engine
        self.load = Load()
        self.servicer = InferenceServicer(engine, self.load)

    def per_call(self, method: str, request: Any, **options: Any) -> InProcessStreamCall:
        return InProcessStreamCall(getattr(self.servicer, method), request, **options)

    def multiplex(self, requests: Any, **options: Any) -> InProcessMultiplexCall:
        return InProcessMultiplexCall(MultiplexSession(self.servicer.core), requests, **options)


TRANSPORTS = ["multiplex", "per-call", "local"]
"""How the facade reaches the agent: gRPC (one Multiplex stream, one call per
request), or directly when the agent runs in its process (`kscope serve`)."""


@contextlib.asynccontextmanager
async def in_process(
    agent: Agent, transport: str, **settings: Any
) -> AsyncIterator[tuple[InferenceProxy, RouteTable]]:
    """A proxy whose one instance of 'm' is `agent`, reached over `transport`."""
    core = agent.servicer.core
    if transport == "local":  # as an agent of this process publishes itself
        local_agents.publish("i-1", "10.0.0.1:7000", core)
    table = RouteTable(dial=lambda address, instance_id: FakeChannel(agent))  # type: ignore[arg-type,return-value]
    table.apply(route_update(1))
    assert (table.models["m"].targets[0].local is core) == (transport == "local")
    config = FacadeSettings(
        controller="127.0.0.1:1", require_key=False, multiplex=transport == "multiplex", **settings
    )
    try:
        yield InferenceProxy(config, table, FakeRouteWatcher()), table  # type: ignore[arg-type]
    finally:
        local_agents.withdraw("i-1", core)
        await table.close()


async def settle(rounds: int = 20) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_in_process_stream(transport: str) -> None:
    agent = Agent(FakeEngine(chunks('{"a":1}', '{"b":2}')))
    async with in_process(agent, transport) as (proxy, _):
        sent = await call(proxy)
    assert sent.messages == [
        start(200, SSE_HEADERS),
        event(b'{"a":1}'),
        event(b'{"b":2}'),
        last(DONE),
    ]
    # The agent asks the engine for usage on the client's behalf (exact token counts).
    asked = STREAM_BODY[:-1] + b',"stream_options":{"include_usage":true}}'
    assert agent.engine.calls == [(Endpoint.CHAT, asked, True)]
    assert agent.load.stats.by_status == {200: 1}
    assert statuses(proxy) == {200: 1}


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_in_process_unary(transport: str) -> None:
    agent = Agent(FakeEngine(chunks('{"id":"cmpl-1"}')))
    async with in_process(agent, transport) as (proxy, _):
        sent = await call(proxy, UNARY_BODY)
    assert sent.messages == [start(200, JSON_HEADERS), last(b'{"id":"cmpl-1"}')]
    assert agent.engine.calls == [(Endpoint.CHAT, UNARY_BODY, False)]
    assert agent.load.stats.by_status == {200: 1}


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_in_process_a_unary_answer_larger_than_the_window(transport: str) -> None:
    # An embeddings batch or a long completion easily passes 256 KiB in one body.
    answer = b'"' + b"x" * (exchange_module.WINDOW_BYTES + 1000) + b'"'
    agent = Agent(FakeEngine([EngineOutput([answer])]))
    async with in_process(agent, transport, request_timeout_s=0.5) as (proxy, _):
        sent = await call(proxy, UNARY_BODY)
    assert sent.status == 200
    assert sent.messages[1:] == [last(answer)]
    assert agent.load.stats.by_status == {200: 1}
    assert statuses(proxy) == {200: 1}


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_in_process_engine_error_reaches_the_client_as_the_engine_said(
    transport: str,
) -> None:
    agent = Agent(FakeEngine(error=EngineError(400, "bad temperature", ENGINE_BODY)))
    async with in_process(agent, transport) as (proxy, _):
        sent = await call(proxy)
    assert sent.messages == [start(400, JSON_HEADERS), last(b'{"error":' + ENGINE_BODY + b"}")]
    assert agent.load.stats.by_status == {400: 1}
    assert statuses(proxy) == {400: 1}


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_in_process_engine_bug_mid_stream_is_an_sse_error(transport: str) -> None:
    agent = Agent(FakeEngine(chunks('{"a":1}'), error=RuntimeError("boom")))
    async with in_process(agent, transport) as (proxy, _):
        sent = await call(proxy)
    assert sent.messages == [
        start(200, SSE_HEADERS),
        event(b'{"a":1}'),
        sse_error(error_body("the engine failed unexpectedly", "upstream_error", None)),
    ]
    assert agent.load.stats.by_status == {500: 1}
    assert statuses(proxy) == {502: 1}


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_in_process_client_disconnect_cancels_the_engine_request(transport: str) -> None:
    agent = Agent(FakeEngine(chunks('{"a":1}'), hang=True))
    async with in_process(agent, transport) as (proxy, table):
        receive, send = ClientReceive(STREAM_BODY), ClientSend()
        task = asyncio.create_task(call(proxy, receive=receive, send=send))
        await send.wait_for(2)
        receive.disconnect()
        await asyncio.wait({task}, timeout=1.0)
        await settle()
        assert task.done()
        # The app returns: nobody to answer is no error of the app's.
        assert not task.cancelled(), "the proxy raised CancelledError out of the ASGI app"
        assert task.exception() is None
        assert send.messages == [start(200, SSE_HEADERS), event(b'{"a":1}')]
        assert agent.engine.cancelled == 1
        assert agent.engine.running == 0
        assert agent.load.stats.by_status == {CANCELLED: 1}
        assert {m: dict(s.by_status) for m, s in proxy.stats.models.items()} == {
            "m": {CANCELLED: 1}
        }
        assert table.models["m"].targets[0].session.idle


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("cut", ["idle", "total"])
async def test_in_process_a_silent_engine_is_cut_with_a_timeout_event(
    transport: str, cut: str
) -> None:
    agent = Agent(FakeEngine(chunks('{"a":1}'), hang=True))
    limit = {"stream_idle_timeout_s": 0.2} if cut == "idle" else {"request_timeout_s": 0.2}
    async with in_process(agent, transport, **limit) as (proxy, _):
        async with asyncio.timeout(2.0):
            sent = await call(proxy)
        await settle()
    message, code = (
        ("sent nothing for", "stream_idle_timeout") if cut == "idle"
        else ("took longer than", "request_timeout")
    )  # fmt: skip
    assert sent.messages == [
        start(200, SSE_HEADERS),
        event(b'{"a":1}'),
        sse_error(error_body(f"the request for 'm' {message} 0.2 s", "timeout_error", code)),
    ]
    assert agent.engine.running == 0  # the engine request was aborted
    assert agent.load.stats.by_status == {CANCELLED: 1}
    assert statuses(proxy) == {504: 1}


@pytest.mark.parametrize("transport", ["multiplex", "local"])
async def test_in_process_a_client_that_stops_reading_stops_the_engine(
    monkeypatch: pytest.MonkeyPatch, transport: str
) -> None:
    window = 128
    monkeypatch.setattr(exchange_module, "WINDOW_BYTES", window)
    monkeypatch.setattr(response_module, "LAST_WORDS_TIMEOUT_S", 0.05)
    agent = Agent(FakeEngine(chunks(*["x" * 60] * 200)))
    async with in_process(agent, transport, stream_idle_timeout_s=0.2) as (proxy, _):
        send = ClientSend()
        send.stall(after=2)
        async with asyncio.timeout(1.0):
            await call(proxy, send=send)
        await settle()
    assert send.messages[0] == start(200, SSE_HEADERS)
    read = send.body.count(b"x" * 60) * 60
    assert read >= 60
    # What the engine gave beyond what the client read is held to the window
    # (a frame may overdraw it once), not the answer's 12 000 bytes; called
    # directly, the engine is pulled only as the client takes chunks: the
    # chunk being written, no more.
    ahead = window + 60 if transport == "multiplex" else 60
    assert agent.engine.pulled * 60 - read <= ahead
    assert agent.engine.running == 0  # and the idle cut aborted its request
    assert agent.load.stats.by_status == {CANCELLED: 1}
    assert statuses(proxy) == {504: 1}


# ---------------------------------------------------------------- more endpoints

RESPONSES_STREAM_BODY = b'{"model":"m","input":"hi","stream":true}'
RESPONSE_EVENTS = [
    b'event: response.created\ndata: {"type":"response.created","sequence_number":0}',
    b'event: response.output_text.delta\ndata: {"delta":"il","sequence_number":1}',
    b'event: response.completed\ndata: {"type":"response.completed","response":'
    b'{"usage":{"input_tokens":3,"output_tokens":1,"total_tokens":4}},"sequence_number":2}',
]
BOUNDARY = b"kscope-boundary-7d3f"
FORM_TYPE = b"multipart/form-data; boundary=" + BOUNDARY
# Bytes a re-encoding would change, and a near miss of the boundary.
AUDIO = bytes(range(256)) + b"\r\n--kscope-boundary-7d3\r\n\r\n" + bytes(range(255, -1, -1))


def form(model: bytes = b"m", audio: bytes = AUDIO, **fields: bytes) -> bytes:
    """A multipart/form-data upload as the openai SDK sends it: the file, then
    the text fields (the model last, so the gateway must look past the file)."""
    parts = [
        b'Content-Disposition: form-data; name="file"; filename="clip.wav"\r\n'
        b"Content-Type: audio/wav\r\n\r\n" + audio
    ]
    for name, value in [*fields.items(), ("model", model)]:
        disposition = b'Content-Disposition: form-data; name="%s"' % name.encode()
        parts.append(disposition + b"\r\n\r\n" + value)
    delimiter = b"--" + BOUNDARY
    return b"".join(delimiter + b"\r\n" + p + b"\r\n" for p in parts) + delimiter + b"--\r\n"


NEW_KINDS = [
    ("/v1/responses", inference_pb2.INFERENCE_KIND_RESPONSE),
    ("/tokenize", inference_pb2.INFERENCE_KIND_TOKENIZE),
    ("/detokenize", inference_pb2.INFERENCE_KIND_DETOKENIZE),
    ("/score", inference_pb2.INFERENCE_KIND_SCORE),
    ("/v1/score", inference_pb2.INFERENCE_KIND_SCORE_V1),
    ("/rerank", inference_pb2.INFERENCE_KIND_RERANK),
    ("/v1/rerank", inference_pb2.INFERENCE_KIND_RERANK_V1),
    ("/v2/rerank", inference_pb2.INFERENCE_KIND_RERANK_V2),
    ("/pooling", inference_pb2.INFERENCE_KIND_POOLING),
    ("/classify", inference_pb2.INFERENCE_KIND_CLASSIFY),
]


@pytest.mark.parametrize(("path", "kind"), NEW_KINDS, ids=[p for p, _ in NEW_KINDS])
async def test_new_endpoints_go_through_the_generic_rpc(path: str, kind: int) -> None:
    body = b'{"model":"m", "prompt": "caf\\u00e9",  "extra": [1, 2]}'  # spaces kept
    proxy, opener, _ = gateway(FakeExchange([b'{"count":2}']))
    sent = await call(proxy, body, path=path)
    assert sent.messages == [start(200, JSON_HEADERS), last(b'{"count":2}')]
    assert opener.opened == [("i-1", kind, "Inference", 600.0)]
    (request,) = opener.requests
    assert isinstance(request, inference_pb2.InferenceRequest)
    assert (request.kind, request.body, request.content_type) == (kind, body, "")
    assert (request.envelope.model, request.envelope.stream) == ("m", False)
    assert request.envelope.request_id == REQUEST_ID.decode()
    assert statuses(proxy) == {200: 1}


async def test_an_endpoint_that_does_not_stream_refuses_stream_true() -> None:
    proxy, opener, _ = gateway()
    sent = await call(proxy, b'{"model":"m","stream":true}', path="/tokenize")
    assert sent.status == 400
    assert orjson.loads(sent.body)["error"]["param"] == "stream"
    assert opener.opened == []


async def test_a_responses_stream_passes_its_events_whole() -> None:
    exchange = FakeExchange(RESPONSE_EVENTS[:2], RESPONSE_EVENTS[2:])
    proxy, opener, _ = gateway(exchange)
    sent = await call(proxy, RESPONSES_STREAM_BODY, path="/v1/responses")
    whole = [{"type": "http.response.body", "more_body": True,
              "body": b"".join(e + b"\n\n" for e in events)}
             for events in (RESPONSE_EVENTS[:2], RESPONSE_EVENTS[2:])]  # fmt: skip
    # The engine's events as it sent them, and the stream ends as it ended it: no [DONE].
    assert sent.messages == [start(200, SSE_HEADERS), *whole, last(b"")]
    assert opener.requests[0].envelope.stream is True
    assert proxy.stream_chunks == 3
    assert proxy.stats.of("m").ttft.count == 1


async def test_a_responses_stream_that_fails_after_it_began_ends_with_an_error_event() -> None:
    bug = agent_failure(grpc.StatusCode.INTERNAL, "the engine failed unexpectedly")
    proxy, _, _ = gateway(FakeExchange(RESPONSE_EVENTS[:1], bug))
    sent = await call(proxy, RESPONSES_STREAM_BODY, path="/v1/responses")
    error = orjson.dumps(
        {"message": "the engine failed unexpectedly", "type": "upstream_error", "param": None,
         "code": None}
    )  # fmt: skip
    assert sent.messages == [
        start(200, SSE_HEADERS),
        {"type": "http.response.body", "body": RESPONSE_EVENTS[0] + b"\n\n", "more_body": True},
        last(b'event: error\ndata: {"type":"error","error":' + error + b"}\n\n"),
    ]
    assert statuses(proxy) == {502: 1}


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/v1/audio/transcriptions", inference_pb2.INFERENCE_KIND_TRANSCRIPTION),
        ("/v1/audio/translations", inference_pb2.INFERENCE_KIND_TRANSLATION),
    ],
)
async def test_a_multipart_upload_routes_by_its_model_field(path: str, kind: int) -> None:
    body = form(language=b"en")
    proxy, opener, _ = gateway(FakeExchange([b'{"text":"hi"}']))
    sent = await call(proxy, body, path=path, content_type=FORM_TYPE)
    assert sent.messages == [start(200, JSON_HEADERS), last(b'{"text":"hi"}')]
    (request,) = opener.requests
    assert opener.opened == [("i-1", kind, "Inference", 600.0)]
    # The bytes and the Content-Type (its boundary) go on unchanged.
    assert (request.body, request.content_type) == (body, FORM_TYPE.decode())
    assert (request.envelope.model, request.envelope.stream) == ("m", False)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_transcription_as_text_keeps_the_engines_content_type(transport: str) -> None:
    # response_format vtt: the engine's label reaches the client on every transport.
    agent = Agent(FakeEngine([EngineOutput([b"WEBVTT\n"], content_type="text/vtt")]))
    async with in_process(agent, transport) as (proxy, _):
        sent = await call(proxy, form(), path="/v1/audio/transcriptions", content_type=FORM_TYPE)
    assert sent.messages == [start(200, [(b"content-type", b"text/vtt")]), last(b"WEBVTT\n")]


async def test_a_multipart_stream_field_makes_a_stream() -> None:
    proxy, opener, _ = gateway(FakeExchange([b'{"delta":"hi"}']))
    sent = await call(
        proxy, form(stream=b"true"), path="/v1/audio/transcriptions", content_type=FORM_TYPE
    )
    assert sent.messages == [start(200, SSE_HEADERS), event(b'{"delta":"hi"}'), last(DONE)]
    assert opener.requests[0].envelope.stream is True


async def test_a_multipart_upload_for_an_unknown_model_is_404() -> None:
    proxy, opener, _ = gateway()
    sent = await call(
        proxy, form(model=b"nope"), path="/v1/audio/transcriptions", content_type=FORM_TYPE
    )
    assert sent.status == 404
    assert orjson.loads(sent.body)["error"]["code"] == "model_not_found"
    assert opener.opened == []


@pytest.mark.parametrize(
    ("body", "content_type", "code"),
    [
        (form(), b"application/json", "invalid_content_type"),
        (form(), b"multipart/form-data", "invalid_content_type"),
        (form(), b"multipart/form-data; boundary=other", "invalid_multipart"),
        (form()[:-40], FORM_TYPE, "invalid_multipart"),
        (form(model=b""), FORM_TYPE, None),
    ],
    ids=["json", "no-boundary", "wrong-boundary", "truncated", "no-model"],
)
async def test_a_bad_multipart_upload_is_400(
    body: bytes, content_type: bytes, code: str | None
) -> None:
    proxy, opener, _ = gateway(cold=("other",))
    sent = await call(proxy, body, path="/v1/audio/transcriptions", content_type=content_type)
    assert sent.status == 400
    error = orjson.loads(sent.body)["error"]
    assert error["code"] == code
    if code is None:  # no model: the error names the field that is missing
        assert error["param"] == "model"
    assert opener.opened == []


def facade_app(proxy: InferenceProxy) -> FacadeApp:
    """The facade's ASGI entry with a static key and `proxy` (no lifespan, no controller)."""
    settings = FacadeSettings(controller="127.0.0.1:1", api_key="sk-test")  # type: ignore[arg-type]
    app = FacadeApp(settings)
    app.keys = KeyChecker(None, "sk-test", True, 60.0)  # type: ignore[arg-type]
    app.proxy = proxy
    return app


@pytest.mark.parametrize("path", ["/tokenize", "/pooling", "/v2/rerank", "/v1/score"])
async def test_a_path_outside_v1_needs_a_key_too(path: str) -> None:
    proxy, opener, _ = gateway(FakeExchange([b'{"ok":1}']))
    app = facade_app(proxy)
    body = b'{"model":"m"}'
    refused = ClientSend()
    await app(scope_of(path), ClientReceive(body), refused)
    assert refused.status == 401
    assert orjson.loads(refused.body)["error"]["code"] == "missing_api_key"
    assert opener.opened == []
    served = ClientSend()
    await app(scope_of(path, [(b"authorization", b"Bearer sk-test")]), ClientReceive(body), served)
    assert served.messages == [start(200, JSON_HEADERS), last(b'{"ok":1}')]


async def test_a_get_to_an_inference_path_outside_v1_is_405() -> None:
    proxy, opener, _ = gateway()
    scope = {**scope_of("/tokenize", [(b"authorization", b"Bearer sk-test")]), "method": "GET"}
    sent = ClientSend()
    await facade_app(proxy)(scope, ClientReceive(b""), sent)
    assert sent.status == 405
    assert opener.opened == []


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_in_process_a_multipart_upload_reaches_the_engine_unchanged(transport: str) -> None:
    body = form(response_format=b"json")
    agent = Agent(FakeEngine(chunks('{"text":"ok"}')))
    async with in_process(agent, transport) as (proxy, _):
        sent = await call(proxy, body, path="/v1/audio/transcriptions", content_type=FORM_TYPE)
    assert sent.messages == [start(200, JSON_HEADERS), last(b'{"text":"ok"}')]
    assert agent.engine.requests == [
        EngineRequest(Endpoint.TRANSCRIPTIONS, body, False, REQUEST_ID.decode(), FORM_TYPE.decode())
    ]
    assert agent.load.stats.by_status == {200: 1}


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_in_process_a_responses_stream(transport: str) -> None:
    outputs = [EngineOutput(RESPONSE_EVENTS[:2]), EngineOutput(RESPONSE_EVENTS[2:])]
    agent = Agent(FakeEngine(outputs))
    async with in_process(agent, transport) as (proxy, _):
        sent = await call(proxy, RESPONSES_STREAM_BODY, path="/v1/responses")
    assert sent.status == 200
    assert sent.body == b"".join(e + b"\n\n" for e in RESPONSE_EVENTS)
    assert sent.ended
    # No stream_options added: only chat and completions streams take them.
    assert agent.engine.calls == [(Endpoint.RESPONSES, RESPONSES_STREAM_BODY, True)]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    ("path", "endpoint"),
    [("/v1/chat/completions", Endpoint.CHAT), ("/rerank", Endpoint.RERANK)],
)
async def test_in_process_the_request_id_reaches_the_engine(
    transport: str, path: str, endpoint: Endpoint
) -> None:
    agent = Agent(FakeEngine(chunks("{}")))
    async with in_process(agent, transport) as (proxy, _):
        sent = await call(proxy, UNARY_BODY, path=path)
    assert sent.status == 200
    (request,) = agent.engine.requests
    assert (request.endpoint, request.request_id) == (endpoint, REQUEST_ID.decode())
