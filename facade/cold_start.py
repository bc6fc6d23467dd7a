"""A request for a model with no READY instance.

By default it is answered at once: 503 with Retry-After from the model's real
state, after asking the controller for capacity (EnsureModel). A client that
sends `X-KScope-Wait: <seconds>` (or the facade's cold_wait_s) is held until an
instance is READY or the wait ends; a waiting stream gets SSE comments saying
what the model is doing, so proxies keep the connection open.
"""

from __future__ import annotations

import asyncio
import contextlib

from facade.asgi import Receive, Scope
from facade.capabilities import Requirement
from facade.errors import ApiError
from facade.response import ResponseWriter
from facade.routing import RouteTable, RouteWatcher, Target
from facade.settings import FacadeSettings
from kscope.v1 import control_pb2

ENSURE_CALL_TIMEOUT_S = 5.0


class ClientGone(Exception):
    """The client disconnected before its request was answered."""


async def disconnected(receive: Receive) -> None:
    """Return when the client goes away (ASGI http.disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class ColdStart:
    """Answers, or holds, requests for models without a READY instance."""

    def __init__(self, settings: FacadeSettings, table: RouteTable, watcher: RouteWatcher):
        self._settings = settings
        self._table = table
        self._watcher = watcher
        self._ensuring: dict[str, asyncio.Future[control_pb2.EnsureModelResponse | None]] = {}
        self._waiting: dict[str, int] = {}
        """Requests held for each cold model now."""
        self.cold_waits: dict[tuple[str, ...], int] = {}
        """Requests that waited for a cold model, by (model, outcome), for /metrics."""

    def waiting(self) -> dict[str, int]:
        return dict(self._waiting)

    async def target(
        self,
        scope: Scope,
        receive: Receive,
        writer: ResponseWriter,
        model: str,
        stream: bool,
        requirement: Requirement,
    ) -> Target | None:
        """A READY target for `model` that can meet `requirement`, waiting if the
        client wants; None when the request was answered (writer.fail) instead.
        ApiError for an at-once refusal."""
        if not self._table.received.is_set():
            # Just started: give the first route table a moment to arrive.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._table.received.wait(), 2.0)
            target = self._table.pick(model, requirement=requirement)
            if target is not None:
                return target
        wait_s = self._wait_seconds(scope)
        if wait_s <= 0 or model not in self._table.names:
            raise await self.no_capacity(model)
        waiting = self._waiting.get(model, 0)
        if waiting >= self._settings.max_waiting_per_model:
            self._count(model, "refused")
            raise ApiError(
                429,
                f"Too many requests are waiting for the model '{model}' to start; retry later.",
                "rate_limit_error",
                code="too_many_waiting",
                retry_after_s=max(1, self._table.names[model].retry_after_s),
            )
        self._waiting[model] = waiting + 1
        outcome = "gone"
        try:
            target = await self._wait(receive, writer, model, stream, wait_s, requirement)
            outcome = "served" if target is not None else "timed_out"
            return target
        finally:
            self._waiting[model] -= 1
            self._count(model, outcome)

    def _count(self, model: str, outcome: str) -> None:
        key = (model, outcome)
        self.cold_waits[key] = self.cold_waits.get(key, 0) + 1

    def _wait_seconds(self, scope: Scope) -> float:
        for name, value in scope["headers"]:
            if name == b"x-kscope-wait":
                try:
                    wait_s = float(value)
                except ValueError:
                    raise ApiError(400, "X-KScope-Wait must be a number of seconds") from None
                return max(0.0, min(wait_s, self._settings.max_wait_s))
        return self._settings.cold_wait_s

    async def _wait(
        self,
        receive: Receive,
        writer: ResponseWriter,
        model: str,
        stream: bool,
        wait_s: float,
        requirement: Requirement,
    ) -> Target | None:
        loop = asyncio.get_running_loop()
        asked = asyncio.ensure_future(self._ensure(model))  # the controller learns of the demand
        gone = asyncio.ensure_future(disconnected(receive))
        start = loop.time()
        deadline = start + wait_s
        next_note = start  # the first comment at once: the client sees the response begin
        said = ""
        try:
            while True:
                target = self._table.pick(model, requirement=requirement)
                now = loop.time()
                if target is not None:
                    if writer.started:
                        await writer.comment(
                            f"model '{model}' is ready after {now - start:.0f} s; generating"
                        )
                    return target
                if now >= deadline:
                    break
                what = self._state_message(model)
                # A comment every interval, and at once when the state changes.
                if stream and (now >= next_note or what != said):
                    await writer.comment(f"waiting for model '{model}' to become ready"
                                         f" ({what}); {now - start:.0f} s so far")  # fmt: skip
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
        entry = self._table.names.get(model)
        message = entry.info.state_message if entry is not None else "unknown"
        await writer.fail(
            ApiError(
                503,
                f"The model '{model}' did not become ready within {wait_s:.0f} s ({message}).",
                "service_unavailable_error",
                code="model_not_ready",
                retry_after_s=max(1, entry.retry_after_s if entry is not None else 1),
            )
        )
        return None

    def _state_message(self, model: str) -> str:
        entry = self._table.names.get(model)
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

    async def no_capacity(self, model: str) -> ApiError:
        """The at-once answer: 404 for a model nobody has, 503 + Retry-After else."""
        entry = self._table.names.get(model)
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
