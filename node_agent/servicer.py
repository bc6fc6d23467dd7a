"""InferenceService: hands each request's OpenAI body to the engine unchanged and
streams the engine's answer back. Cancelling the call aborts the engine request."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import grpc

from kscope.v1 import inference_pb2, inference_pb2_grpc
from kscope_common.errors import grpc_code_for_http
from kscope_common.request_stats import CANCELLED
from node_agent.engines.base import Endpoint, Engine, EngineError, EngineOutput, copy_usage
from node_agent.load import Load, RequestClock
from node_agent.multiplex import MultiplexSession
from node_agent.queue import QueueLimits, RequestQueue

log = logging.getLogger(__name__)


class _Request(Protocol):
    envelope: inference_pb2.RequestEnvelope
    body: bytes


Context = grpc.aio.ServicerContext[Any, Any]


def _error_metadata(exc: EngineError) -> tuple[tuple[str, str | bytes], ...]:
    return (("kscope-http-status", str(exc.http_status)), ("kscope-error-bin", exc.openai_error()))


def _handler(
    endpoint: Endpoint, response_cls: Callable[..., Any]
) -> Callable[[InferenceServicer, _Request, Context], AsyncIterator[Any]]:
    async def handle(
        self: InferenceServicer, request: _Request, context: Context
    ) -> AsyncIterator[Any]:
        if self.load.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "agent is draining")
        clock = RequestClock(self.load.stats, request.envelope.stream)
        status = CANCELLED
        try:
            # The queue counts this request as queued, then in flight.
            async with self.queue.slot():
                output: EngineOutput
                async for output in self.engine.generate(
                    endpoint, request.body, request.envelope.stream
                ):
                    clock.saw(output)
                    message = response_cls(chunks=output.chunks)
                    copy_usage(output, message.usage)
                    yield message
            status = 200
        except EngineError as exc:
            status = exc.http_status
            log.info(
                "request %s failed in the engine: %s", request.envelope.request_id, exc.message
            )
            context.set_trailing_metadata(_error_metadata(exc))
            await context.abort(grpc_code_for_http(exc.http_status), exc.message)
        except Exception:
            status = 500
            raise
        finally:
            clock.end(status)

    return handle


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    """One engine behind the three OpenAI endpoints."""

    def __init__(self, engine: Engine, load: Load, queue: RequestQueue | None = None):
        self.engine = engine
        self.load = load
        self.queue = queue or RequestQueue(QueueLimits(), load)

    ChatCompletion = _handler(Endpoint.CHAT, inference_pb2.ChatCompletionResponse)  # type: ignore[assignment]
    Completion = _handler(Endpoint.COMPLETIONS, inference_pb2.CompletionResponse)  # type: ignore[assignment]
    Embedding = _handler(Endpoint.EMBEDDINGS, inference_pb2.EmbeddingResponse)  # type: ignore[assignment]

    async def Multiplex(
        self,
        request_iterator: AsyncIterator[inference_pb2.MultiplexRequest],
        context: Context,
    ) -> AsyncIterator[inference_pb2.MultiplexResponse]:
        session = MultiplexSession(self.engine, self.load, self.queue)
        async for response in session.serve(request_iterator):
            yield response
