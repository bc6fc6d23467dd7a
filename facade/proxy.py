"""The token path: POST /v1/{chat/completions,completions,embeddings} as raw ASGI.

Raw ASGI rather than FastAPI routes because this runs for every request and
every chunk (ENVIRONMENT.md measured the difference), and because disconnect
detection needs the ASGI receive channel. Each engine chunk is written to the
client as soon as the agent's message arrives; nothing waits for company.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import grpc
import orjson

from facade.auth import GRANT_SCOPE_KEY, Grant, model_forbidden
from facade.errors import ApiError
from facade.exchange import AgentFailure, MultiplexExchange, PerCallExchange
from facade.routing import RouteTable, RouteWatcher, Target
from facade.settings import FacadeSettings
from kscope.v1 import control_pb2, inference_pb2
from kscope_common.request_stats import CANCELLED, RequestStats

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_JSON_HEADERS = [(b"content-type", b"application/json")]
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_DONE = b"data: [DONE]\n\n"
ENSURE_CALL_TIMEOUT_S = 5.0
Exchange = PerCallExchange | MultiplexExchange


class _Kind:
    """What differs between the three inference endpoints."""

    def __init__(
        self,
        rpc: str,
        request_cls: Callable[..., Any],
        required: str,
        accepted: tuple[type, ...],
        streams: bool,
        multiplex_kind: int,
    ):
        self.multiplex_kind = multiplex_kind
        self.rpc = rpc
        self.request_cls = request_cls
        self.required = required
        self.accepted = accepted
        self.streams = streams


KINDS = {
    "/v1/chat/completions": _Kind(
        "ChatCompletion",
        inference_pb2.ChatCompletionRequest,
        "messages",
        (list,),
        True,
        inference_pb2.INFERENCE_KIND_CHAT_COMPLETION,
    ),
    "/v1/completions": _Kind(
        "Completion",
        inference_pb2.CompletionRequest,
        "prompt",
        (str, list),
        True,
        inference_pb2.INFERENCE_KIND_COMPLETION,
    ),
    "/v1/embeddings": _Kind(
        "Embedding",
        inference_pb2.EmbeddingRequest,
        "input",
        (str, list),
        False,
        inference_pb2.INFERENCE_KIND_EMBEDDING,
    ),
}


ERRORS: dict[int, int] = {}
"""Error answers sent, by HTTP status (for /metrics)."""


async def send_error(send: Send, error: ApiError) -> None:
    ERRORS[error.status] = ERRORS.get(error.status, 0) + 1
    headers = list(_JSON_HEADERS)
    if error.retry_after_s is not None:
        headers.append((b"retry-after", str(error.retry_after_s).encode()))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": error.body()})


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole request body, refusing more than `limit` bytes."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise _too_large(limit)
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


class ClientGone(Exception):
    """The client disconnected before its request was complete."""


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body is larger than {limit} bytes", code="request_too_large")


def parse_request(body: bytes, kind: _Kind, default_model: str = "") -> tuple[str, bool]:
    """Validate what the gateway itself needs; return (model, stream). Every other
    field goes to the engine unchanged, and the engine judges it. `default_model`
    stands in for a missing model (settings.default_model)."""
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(request, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    model = request.get("model", default_model) or default_model
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required and must be a non-empty string", param="model")
    stream = request.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", param="stream")
    if stream and not kind.streams:
        raise ApiError(400, "this endpoint does not stream", param="stream")
    value = request.get(kind.required)
    if value is None:
        raise ApiError(400, f"'{kind.required}' is required", param=kind.required)
    if not isinstance(value, kind.accepted):
        names = " or ".join("array" if t is list else "string" for t in kind.accepted)
        raise ApiError(400, f"'{kind.required}' must be {names}", param=kind.required)
    return model, stream


class Observed:
    """One request's ASGI send, noting for the metrics the status it sent and
    when its first SSE data event (its first token) left. Until then it looks
    at each message; after, it only passes them on."""

    __slots__ = ("_send", "first_token_at", "start", "status")

    def __init__(self, send: Send):
        self._send = send
        self.start = time.monotonic()
        self.status = CANCELLED
        """Until a response starts, the request counts as one its client left."""
        self.first_token_at = 0.0

    async def __call__(self, message: Message) -> None:
        if not self.first_token_at:
            if message["type"] == "http.response.start":
                self.status = message["status"]
            elif message.get("body", b"").startswith(b"data: "):
                self.first_token_at = time.monotonic()
        await self._send(message)


class InferenceProxy:
    """Handles the three inference endpoints from start to end."""

    def __init__(self, settings: FacadeSettings, table: RouteTable, watcher: RouteWatcher):
        self._settings = settings
        self._table = table
        self._watcher = watcher
        self._ensuring: dict[str, asyncio.Future[control_pb2.EnsureModelResponse | None]] = {}
        self._waiting: dict[str, int] = {}
        """Requests held for each cold model now (X-KScope-Wait)."""
        # For /metrics: plain counters, read when it is scraped.
        self.stats = RequestStats()
        """Every inference request, by model, as it ended."""
        self.stream_chunks = 0
        """SSE events forwarded to clients."""
        self.cold_waits: dict[tuple[str, ...], int] = {}
        """Requests that waited for a cold model, by (model, outcome)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send, kind: _Kind) -> None:
        observed = Observed(send)
        model = ""
        try:
            model = await self._handle(scope, receive, observed, kind)
        finally:
            # Labelled by model only for catalog models: a client's typo is no new series.
            stats = self.stats.of(model if model in self._table.models else "")
            stats.ended(observed.status, time.monotonic() - observed.start)
            if observed.first_token_at and observed.status == 200:
                stats.ttft.observe(observed.first_token_at - observed.start)

    async def _handle(self, scope: Scope, receive: Receive, send: Observed, kind: _Kind) -> str:
        """Answer one request; returns its model ('' when it had none)."""
        model = ""
        try:
            body = await read_body(scope, receive, self._settings.max_body_bytes)
            model, stream = parse_request(body, kind, self._settings.default_model)
            if self._settings.default_model and model not in self._table.models:
                model = self._settings.default_model
            grant: Grant | None = scope.get(GRANT_SCOPE_KEY)
            if grant is not None and not grant.allows(model):
                raise model_forbidden(model)
            started = False
            target = self._table.pick(model)
            if target is None:
                target, started = await self._cold(scope, receive, send, model, stream)
                if target is None:
                    return model
        except ApiError as error:
            await send_error(send, error)
            return model
        except ClientGone:
            return model
        request_id = f"req-{uuid.uuid4().hex[:16]}"
        request = kind.request_cls(
            envelope=inference_pb2.RequestEnvelope(
                request_id=request_id, model=model, stream=stream
            ),
            body=body,
        )
        await self._forward(target, kind, request, model, stream, receive, send, started)
        return model

    async def _cold(
        self, scope: Scope, receive: Receive, send: Observed, model: str, stream: bool
    ) -> tuple[Target | None, bool]:
        """No READY instance: answer 503 + Retry-After at once, or hold the request
        while the client (X-KScope-Wait: seconds) or the server (cold_wait_s) is
        willing to wait. Returns the target and whether an SSE response already
        started (progress comments); (None, _) when the request was answered."""
        if not self._table.received.is_set():
            # Just started: give the first route table a moment to arrive.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._table.received.wait(), 2.0)
            target = self._table.pick(model)
            if target is not None:
                return target, False
        wait_s = self._wait_seconds(scope)
        if wait_s <= 0 or model not in self._table.models:
            raise await self._no_capacity(model)
        waiting = self._waiting.get(model, 0)
        if waiting >= self._settings.max_waiting_per_model:
            self._count_wait(model, "refused")
            raise ApiError(
                429,
                f"Too many requests are waiting for the model '{model}' to start; retry later.",
                "rate_limit_error",
                code="too_many_waiting",
                retry_after_s=max(1, self._table.models[model].retry_after_s),
            )
        self._waiting[model] = waiting + 1
        outcome = "gone"
        try:
            target, started = await self._wait_for_target(receive, send, model, stream, wait_s)
            outcome = "served" if target is not None else "timed_out"
            return target, started
        finally:
            self._waiting[model] -= 1
            self._count_wait(model, outcome)

    def _count_wait(self, model: str, outcome: str) -> None:
        key = (model, outcome)
        self.cold_waits[key] = self.cold_waits.get(key, 0) + 1

    def waiting(self) -> dict[str, int]:
        return dict(self._waiting)

    def _wait_seconds(self, scope: Scope) -> float:
        for name, value in scope["headers"]:
            if name == b"x-kscope-wait":
                try:
                    wait_s = float(value)
                except ValueError:
                    raise ApiError(400, "X-KScope-Wait must be a number of seconds") from None
                return max(0.0, min(wait_s, self._settings.max_wait_s))
        return self._settings.cold_wait_s

    async def _wait_for_target(
        self, receive: Receive, send: Observed, model: str, stream: bool, wait_s: float
    ) -> tuple[Target | None, bool]:
        loop = asyncio.get_running_loop()
        asked = asyncio.ensure_future(self._ensure(model))  # the controller learns of the demand
        gone = asyncio.ensure_future(_disconnected(receive))
        started = False
        start = loop.time()
        deadline = start + wait_s
        next_note = start  # the first comment at once: the client sees the response begin
        said = ""
        try:
            while True:
                target = self._table.pick(model)
                now = loop.time()
                if target is not None:
                    if started:
                        await send(_comment(f"model '{model}' is ready after"
                                            f" {now - start:.0f} s; generating"))  # fmt: skip
                    return target, started
                if now >= deadline:
                    break
                what = self._state_message(model)
                # A comment every interval, and at once when the state changes.
                if stream and (now >= next_note or what != said):
                    if not started:
                        await send(
                            {"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS}
                        )
                        started = True
                    await send(_comment(f"waiting for model '{model}' to become ready"
                                        f" ({what}); {now - start:.0f} s so far"))  # fmt: skip
                    said = what
                    next_note = now + self._settings.wait_progress_interval_s
                until = min(deadline, next_note) if stream else deadline
                updated = asyncio.ensure_future(self._table.updated.wait())
                try:
                    await asyncio.wait({updated, gone}, timeout=max(0.0, until - now),
                                       return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                finally:
                    updated.cancel()
                if gone.done():
                    raise ClientGone  # nobody to answer
        finally:
            gone.cancel()
            asked.cancel()
        entry = self._table.models.get(model)
        message = entry.info.state_message if entry is not None else "unknown"
        error = ApiError(
            503,
            f"The model '{model}' did not become ready within {wait_s:.0f} s ({message}).",
            "service_unavailable_error",
            code="model_not_ready",
            retry_after_s=max(1, entry.retry_after_s if entry is not None else 1),
        )
        if started:
            await _send_stream_error(send, error)
        else:
            await send_error(send, error)
        return None, started

    def _state_message(self, model: str) -> str:
        entry = self._table.models.get(model)
        return entry.info.state_message if entry is not None else ""

    async def _ensure(self, model: str) -> control_pb2.EnsureModelResponse | None:
        """Ask the controller for capacity. The call itself gets seconds to reach
        the controller (the demand must not be lost on a busy machine), but the
        client's 503 waits for its answer only `ensure_timeout_s`."""
        pending = self._ensuring.get(model)
        if pending is None:
            pending = asyncio.ensure_future(
                self._watcher.ensure_model(model, ENSURE_CALL_TIMEOUT_S)
            )
            self._ensuring[model] = pending
            pending.add_done_callback(lambda _: self._ensuring.pop(model, None))
        done, _ = await asyncio.wait({pending}, timeout=self._settings.ensure_timeout_s)
        return pending.result() if done else None

    async def _no_capacity(self, model: str) -> ApiError:
        entry = self._table.models.get(model)
        if entry is None and self._table.received.is_set():
            return ApiError(
                404,
                f"The model '{model}' does not exist. GET /v1/models lists the models.",
                code="model_not_found",
                param="model",
            )
        answer = await self._ensure(model)
        if answer is not None:
            retry, message = answer.retry_after_seconds, answer.model.state_message
        elif entry is not None:
            retry, message = entry.retry_after_s, entry.info.state_message
        else:
            return ApiError(
                503,
                "the gateway has no route table yet (controller unreachable); retry shortly",
                "service_unavailable_error",
                code="controller_unavailable",
                retry_after_s=2,
            )
        return ApiError(
            503,
            f"The model '{model}' is not ready ({message}); capacity has been requested. "
            f"Retry after {max(retry, 1)} s.",
            "service_unavailable_error",
            code="model_not_ready",
            retry_after_s=max(retry, 1),
        )

    def _open(self, target: Target, kind: _Kind, request: Any, model: str) -> Exchange:
        if self._settings.multiplex:
            return target.session.open(kind.multiplex_kind, request.envelope, request.body, model)
        call = getattr(target.stub, kind.rpc)(request, timeout=self._settings.request_timeout_s)
        return PerCallExchange(call, model)

    async def _forward(
        self,
        target: Target,
        kind: _Kind,
        request: Any,
        model: str,
        stream: bool,
        receive: Receive,
        send: Observed,
        started: bool = False,
    ) -> None:
        """`started`: the SSE response already began (a waiting request's comments)."""
        for attempt in range(2):
            target.outstanding += 1
            exchange = self._open(target, kind, request, model)
            watcher = asyncio.ensure_future(_cancel_on_disconnect(receive, exchange))
            try:
                async with asyncio.timeout(self._settings.request_timeout_s):
                    if stream:
                        await self._stream(exchange, send, model, started)
                    else:
                        await self._unary(exchange, send)
                return
            except AgentFailure as failure:
                if failure.code is grpc.StatusCode.CANCELLED and watcher.done():
                    send.status = CANCELLED
                    return  # the client left; nobody to answer
                if attempt == 0 and failure.transport:
                    # Nothing reached the client yet: try another READY instance.
                    target.suspect_until = time.monotonic() + 5
                    other = self._table.pick(model, avoid=target)
                    if other is not None:
                        log.warning("instance %s unavailable; retrying on %s",
                                    target.instance_id, other.instance_id)  # fmt: skip
                        target = other
                        continue
                await send_error(send, failure.error)
                return
            except TimeoutError:
                error = ApiError(504, f"request to {model!r} timed out", "timeout_error",
                                 code="timeout")  # fmt: skip
                await (_send_stream_error(send, error) if started else send_error(send, error))
                return
            finally:
                watcher.cancel()
                exchange.cancel()
                target.outstanding -= 1

    async def _unary(self, exchange: Exchange, send: Observed) -> None:
        parts: list[bytes] = []
        async for chunks in exchange.chunks():
            parts.extend(chunks)
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        await send({"type": "http.response.start", "status": 200, "headers": _JSON_HEADERS})
        await send({"type": "http.response.body", "body": body})

    async def _stream(
        self, exchange: Exchange, send: Observed, model: str, started: bool = False
    ) -> None:
        """Forward an event stream. The response starts with the first message,
        so an error before it is still a proper HTTP error; one after it is an
        SSE error event followed by [DONE]. `started`: it already began."""
        events = 0
        try:
            async for chunks in exchange.chunks():
                if not started:
                    await send(
                        {"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS}
                    )
                    started = True
                events += len(chunks)
                payload = b"".join([b"data: " + c + b"\n\n" for c in chunks])
                await send({"type": "http.response.body", "body": payload, "more_body": True})
        except AgentFailure as failure:
            if not started:
                raise
            if failure.code is not grpc.StatusCode.CANCELLED:
                log.warning("stream for %s broke after it started: %s", model, failure)
                await _send_stream_error(send, failure.error)
            return
        finally:
            self.stream_chunks += events
        if not started:
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        await send({"type": "http.response.body", "body": _DONE})


def _comment(text: str) -> Message:
    """An SSE comment line: clients ignore it, proxies see the connection live."""
    line = ": " + text.replace("\r", " ").replace("\n", " ") + "\n\n"
    return {"type": "http.response.body", "more_body": True, "body": line.encode()}


async def _send_stream_error(send: Observed, error: ApiError) -> None:
    send.status = error.status  # what the request ended with, though the HTTP status was 200
    event = b"data: " + error.body() + b"\n\n" + _DONE
    with contextlib.suppress(Exception):
        await send({"type": "http.response.body", "body": event})


async def _disconnected(receive: Receive) -> None:
    """Return when the client goes away (ASGI http.disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _cancel_on_disconnect(receive: Receive, exchange: Exchange) -> None:
    """Cancel the agent request when the client goes away (ASGI http.disconnect)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            exchange.cancel()
            return
