"""The token path: POST to every inference endpoint (facade/endpoints.py) as raw ASGI.

Raw ASGI rather than FastAPI routes because this runs for every request and
every chunk (ENVIRONMENT.md measured the difference), and because disconnect
detection needs the ASGI receive channel. Each engine chunk is written to the
client as soon as the agent's message arrives; nothing waits for company.

One request's life on this side: read and check the body, find a READY
instance (facade/cold_start.py when there is none), open an exchange with its
agent (facade/exchange.py; the transport is chosen once), forward what comes
back through a ResponseWriter (facade/response.py), which alone decides how
an error is told. Streams end after `stream_idle_timeout_s` without a chunk
or `request_timeout_s` in all, with an SSE error event and [DONE] (504).
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing
from typing import Any

import grpc

from facade.asgi import Receive, Scope, Send
from facade.auth import GRANT_SCOPE_KEY, OPEN, Grant, model_forbidden
from facade.capabilities import Requirement, refusal, requirement_for
from facade.cold_start import ClientGone, ColdStart
from facade.endpoints import EndpointKind, content_type_of, parse_request
from facade.errors import AgentFailure, ApiError
from facade.exchange import Exchange, opener_for
from facade.limits import Admission, Limiter, Subject
from facade.request_log import access, request_id
from facade.response import ResponseWriter
from facade.routing import RouteTable, RouteWatcher, Target
from facade.settings import FacadeSettings
from facade.usage import UsageRecorder
from kscope.v1 import control_pb2, inference_pb2
from kscope_common.limits import Limits
from kscope_common.request_stats import RequestStats

log = logging.getLogger(__name__)


RESCHEDULE_EVERY_S = 1.0
"""The idle timer moves at most this often (a timer per chunk would cost more
than the chunk); shorter idle timeouts move it every quarter of themselves."""


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


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body is larger than {limit} bytes", code="request_too_large")


class StreamTimeout(Exception):
    def __init__(self, error: ApiError):
        super().__init__(error.message)
        self.error = error


class InferenceProxy:
    """Handles every inference endpoint (facade/endpoints.py) from start to end."""

    def __init__(self, settings: FacadeSettings, table: RouteTable, watcher: RouteWatcher):
        self._settings = settings
        self._table = table
        self._open = opener_for(settings.multiplex)
        self.cold = ColdStart(settings, table, watcher)
        # For /metrics: plain counters, read when it is scraped.
        self.stats = RequestStats()
        """Every inference request, by model, as it ended."""
        self.stream_chunks = 0
        """SSE events forwarded to clients."""
        self.limiter = Limiter()
        self._key_limits: dict[str, tuple[control_pb2.Model, Limits]] = {}
        """A model's catalog key_limits, read once per route update."""
        self.usage = UsageRecorder(self.limiter)

    @property
    def cold_waits(self) -> dict[tuple[str, ...], int]:
        return self.cold.cold_waits

    def waiting(self) -> dict[str, int]:
        return self.cold.waiting()

    async def __call__(
        self, scope: Scope, receive: Receive, send: Send, kind: EndpointKind
    ) -> None:
        writer = ResponseWriter(send)
        grant: Grant = scope.get(GRANT_SCOPE_KEY) or OPEN
        model = ""
        rid = request_id(scope)
        writer.headers = [(b"x-request-id", rid)]
        writer.whole_events = kind.whole_events
        admission = self.limiter.admit(grant.subjects)
        admitted: list[Admission] = []
        try:
            if isinstance(admission, ApiError):
                await writer.fail(admission)
                return
            admitted.append(admission)
            writer.headers.extend(admission.headers)
            model = await self._handle(scope, receive, writer, kind, grant, rid.decode(), admitted)
        finally:
            usage = writer.usage
            for taken in admitted:
                taken.release(usage.total_tokens if usage is not None else 0)
            # Labelled by model only for catalog models: a client's typo is no
            # new series; an alias counts as its model.
            known = self._catalog_name(model)
            stats = self.stats.of(known)
            duration_s = time.monotonic() - writer.start
            stats.ended(writer.status, duration_s)
            if writer.first_token_at and writer.status == 200:
                stats.ttft.observe(writer.first_token_at - writer.start)
            self.usage.record(
                grant.key_id, grant.owner, known, kind.path, writer.status, duration_s, usage
            )
            access(
                scope, model=model, key_id=grant.key_id, owner=grant.owner, status=writer.status,
                duration_s=duration_s,
                ttft_s=writer.first_token_at - writer.start if writer.first_token_at else 0.0,
                usage=usage,
            )  # fmt: skip

    async def _handle(
        self,
        scope: Scope,
        receive: Receive,
        writer: ResponseWriter,
        kind: EndpointKind,
        grant: Grant,
        rid: str,
        admitted: list[Admission],
    ) -> str:
        """Answer one request; returns its model ('' when it had none)."""
        model = ""
        content_type = b""
        try:
            body = await read_body(scope, receive, self._settings.max_body_bytes)
            if kind.form:  # the model is a form field; the boundary must reach the engine
                content_type = content_type_of(scope["headers"])
            model, stream, parsed = parse_request(body, kind, self._default_model(), content_type)
            if self._settings.default_model and model not in self._table.names:
                model = self._settings.default_model
            if not grant.allows(model):
                raise model_forbidden(model)
            per_model = self._admit_to_model(grant, model)
            if per_model is not None:
                if isinstance(per_model, ApiError):
                    raise per_model
                admitted.append(per_model)
                if not admitted[0].headers:  # the key's own per-minute limits say it
                    writer.headers.extend(per_model.headers)
            # What the model cannot do is refused here, before any instance sees it.
            caps = self._table.capabilities(model)
            requirement = requirement_for(kind.path, body, parsed, caps)
            refused = refusal(model, requirement, caps)
            if refused is not None:
                raise refused
            target = self._table.pick(model, requirement=requirement)
            if target is None:
                target = await self.cold.target(scope, receive, writer, model, stream, requirement)
                if target is None:
                    return model
        except ApiError as error:
            await writer.fail(error)
            return model
        except ClientGone:
            writer.client_left()
            return model
        request = kind.request(
            inference_pb2.RequestEnvelope(
                request_id=rid, model=model, stream=stream,
                # The agent's queue serves by priority, then takes turns by
                # caller: fair share between owners.
                caller=grant.owner, priority=grant.priority,
            ),
            body,
            content_type.decode("latin-1"),
        )  # fmt: skip
        await self._forward(target, kind, request, model, stream, receive, writer, requirement)
        return model

    def _catalog_name(self, model: str) -> str:
        """The catalog model a name stands for ('' for none): aliases count as their model."""
        entry = self._table.names.get(model)
        if entry is None:
            return ""
        return entry.alias_of or model

    def _admit_to_model(self, grant: Grant, model: str) -> Admission | ApiError | None:
        """The catalog's key_limits of `model` for this request's key (None: it has none)."""
        entry = self._table.names.get(model)
        if entry is None or not grant.key_id or not entry.info.HasField("key_limits"):
            return None
        cached = self._key_limits.get(model)
        if cached is None or cached[0] is not entry.info:
            cached = (entry.info, Limits.from_proto(entry.info.key_limits))
            self._key_limits[model] = cached
        name = f"key:{grant.key_id}@{entry.alias_of or model}"
        return self.limiter.admit((Subject(name, cached[1], f"this API key on {model!r}"),))

    def _default_model(self) -> str:
        """What a request that names no model gets: settings.default_model, or
        the catalog's only model (as `vllm serve` answers with its one model)."""
        if self._settings.default_model:
            return self._settings.default_model
        models = self._table.models
        return next(iter(models)) if len(models) == 1 else ""

    def _total_timeout_s(self) -> float | None:
        return self._settings.request_timeout_s or None

    async def _forward(
        self,
        target: Target,
        kind: EndpointKind,
        request: Any,
        model: str,
        stream: bool,
        receive: Receive,
        writer: ResponseWriter,
        requirement: Requirement,
    ) -> None:
        for attempt in range(2):
            attempted = target  # a retry switches `target`; the count is this one's
            attempted.outstanding += 1
            exchange = self._open(
                target, kind.kind, request, model, kind.rpc, self._total_timeout_s()
            )
            watcher = asyncio.ensure_future(_cancel_on_disconnect(receive, exchange))
            try:
                if stream:
                    await self._stream(exchange, writer, model)
                else:
                    await self._unary(exchange, writer, model)
                return
            except AgentFailure as failure:
                if failure.code is grpc.StatusCode.CANCELLED and watcher.done():
                    writer.client_left()  # nobody to answer
                    return
                if attempt == 0 and failure.transport and not writer.first_token_at:
                    # Nothing of the answer reached the client: another READY instance may do.
                    target.suspect_until = time.monotonic() + 5
                    other = self._table.pick(model, avoid=target, requirement=requirement)
                    if other is not None:
                        log.warning("instance %s unavailable; retrying on %s",
                                    target.instance_id, other.instance_id)  # fmt: skip
                        target = other
                        continue
                if writer.started:
                    log.warning("stream for %s broke after it started: %s", model, failure)
                await writer.fail(failure.error)
                return
            except StreamTimeout as timeout:
                log.info("request for %s: %s", model, timeout.error.message)
                await writer.fail(timeout.error)
                return
            finally:
                watcher.cancel()
                exchange.cancel()
                attempted.outstanding -= 1

    async def _unary(self, exchange: Exchange, writer: ResponseWriter, model: str) -> None:
        parts: list[bytes] = []
        try:
            async with asyncio.timeout(self._total_timeout_s()), aclosing(exchange.chunks()) as got:
                async for chunks in got:
                    parts.extend(chunks)
                    exchange.consumed(chunks)
        except TimeoutError:
            raise StreamTimeout(_timed_out(model, self._total_timeout_s(), total=True)) from None
        writer.usage = exchange.usage
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        await writer.json(body, exchange.content_type)

    async def _stream(self, exchange: Exchange, writer: ResponseWriter, model: str) -> None:
        """Forward an event stream. It begins with the first chunk, so an error
        before it is still a proper HTTP error (the writer decides)."""
        loop = asyncio.get_running_loop()
        idle_s = self._settings.stream_idle_timeout_s
        total_s = self._total_timeout_s()
        cap_at = loop.time() + total_s if total_s else float("inf")
        # The idle deadline moves every `step`, a little past idle_s, so a
        # stream is cut between idle_s and idle_s + step after its last chunk.
        # Before the first chunk only the cap counts: a request may wait in
        # the agent's queue (queue_timeout_s) for longer than idle_s.
        step = min(RESCHEDULE_EVERY_S, idle_s / 4)
        events = 0
        moved_at = -step  # the first chunk moves the deadline
        try:
            # aclosing: an exchange left early (a timeout, a client gone) is
            # closed now, not whenever the garbage collector gets to it.
            async with (
                asyncio.timeout_at(cap_at if total_s else None) as timer,
                aclosing(exchange.chunks()) as got,
            ):
                async for chunks in got:
                    await writer.events(chunks)
                    exchange.consumed(chunks)
                    events += len(chunks)
                    now = loop.time()
                    if now - moved_at >= step:
                        moved_at = now
                        timer.reschedule(min(now + idle_s + step, cap_at))
        except TimeoutError:
            total = loop.time() >= cap_at - 0.01
            raise StreamTimeout(
                _timed_out(model, total_s if total else idle_s, total=total)
            ) from None
        finally:
            self.stream_chunks += events
            writer.usage = exchange.usage
        await writer.done()


def _timed_out(model: str, seconds: float | None, total: bool) -> ApiError:
    what = "took longer than" if total else "sent nothing for"
    return ApiError(
        504,
        f"the request for {model!r} {what} {seconds or 0:g} s",
        "timeout_error",
        code="request_timeout" if total else "stream_idle_timeout",
    )


async def _cancel_on_disconnect(receive: Receive, exchange: Exchange) -> None:
    """Cancel the agent request when the client goes away (ASGI http.disconnect)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            exchange.cancel()
            return
