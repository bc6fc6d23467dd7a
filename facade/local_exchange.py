"""One request's exchange with an agent that runs in this process (`kscope
serve`'s local agents, node_agent/in_process.py): the agent's request life is
iterated here, with no gRPC, no framing and no other task in between.

It is the same life both gRPC transports run (node_agent/request_life.py), so
admission, the queue, accounting and every error are the agent's own, and a
failure reads exactly as it would over gRPC (facade/errors.py `failure`).
Flow control is the iteration itself: the engine is read only as the client
takes what was read.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import grpc

from facade.errors import failure, request_error
from kscope.v1 import inference_pb2
from node_agent.engines.base import EngineOutput, copy_usage
from node_agent.request_life import AgentCore, RequestFailed, endpoint_of, serve_request

_CANCELLED = request_error(grpc.StatusCode.CANCELLED, "cancelled")


class LocalExchange:
    def __init__(self, core: AgentCore, kind: int, request: Any, model: str):
        self._core = core
        self._kind = kind
        self._request = request
        self._model = model
        self._life: AsyncGenerator[EngineOutput, None] | None = None
        self._waiting: asyncio.Task[Any] | None = None
        """The task waiting for the engine, while it waits."""
        self._cancelled = False
        self.usage: inference_pb2.Usage | None = None
        self.content_type = ""

    async def chunks(self) -> AsyncGenerator[Sequence[bytes], None]:
        task = asyncio.current_task()
        try:
            life = self._life = self._start()
            while not self._cancelled:
                self._waiting = task
                try:
                    output = await anext(life)
                except StopAsyncIteration:
                    return
                finally:
                    self._waiting = None
                if output.usage is not None:
                    self.usage = inference_pb2.Usage()
                    copy_usage(output, self.usage)
                if output.content_type:
                    self.content_type = output.content_type
                if output.chunks:
                    yield output.chunks
            raise failure(_CANCELLED, self._model)
        except RequestFailed as failed:
            raise failure(failed.error, self._model) from None
        except asyncio.CancelledError:
            # cancel() interrupts the wait for the engine by cancelling this
            # task; that cancellation (and no other) becomes the request's end.
            if self._cancelled and task is not None and task.uncancel() == 0:
                raise failure(_CANCELLED, self._model) from None
            raise
        finally:
            # Closed here unless cancel() already took it (it was left at a yield).
            left, self._life = self._life, None
            if left is not None:
                await left.aclose()

    def _start(self) -> AsyncGenerator[EngineOutput, None]:
        request = self._request
        # Only the generic request has a content type (the three first kinds are JSON).
        generic = type(request) is inference_pb2.InferenceRequest
        return serve_request(
            self._core,
            endpoint_of(self._kind),
            request.body,
            request.envelope,
            request.content_type if generic else "",
        )

    def consumed(self, chunks: Sequence[bytes]) -> None:
        """Nothing to grant: the engine is read only as the client takes chunks."""

    def cancel(self) -> None:
        if self._cancelled:
            return
        self._cancelled = True
        if self._waiting is not None:
            self._waiting.cancel()
        elif self._life is not None:
            # Left between two chunks (a timeout, a client gone while being
            # written to): end the engine request and free its queue slot now.
            life, self._life = self._life, None
            _closing.add(task := asyncio.ensure_future(life.aclose()))
            task.add_done_callback(_closing.discard)


_closing: set[asyncio.Future[None]] = set()
"""Request lives being closed (a task nobody else holds must be kept alive)."""
