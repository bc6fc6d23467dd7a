"""InferenceService: hands each request's body to the engine unchanged and
streams the engine's answer back. Cancelling the call aborts the engine request.

The request's life is node_agent/request_life.py's; this module only encodes
its outputs (one message each) and its failure (the call's status, with the
RequestError in the trailing metadata, as the facade reads it)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol, cast

import grpc

from kscope.v1 import inference_pb2, inference_pb2_grpc
from node_agent.engines.base import Endpoint, Engine, copy_usage
from node_agent.load import Load
from node_agent.multiplex import MultiplexSession
from node_agent.queue import QueueLimits, RequestQueue
from node_agent.request_life import AgentCore, RequestFailed, endpoint_of, serve_request

ERROR_METADATA_KEY = "kscope-request-error-bin"
"""Trailing metadata carrying the serialized RequestError of a failed call."""


class _Request(Protocol):
    envelope: inference_pb2.RequestEnvelope
    body: bytes


Context = grpc.aio.ServicerContext[Any, Any]


def _handler(
    endpoint: Endpoint | None, response_cls: Callable[..., Any]
) -> Callable[[InferenceServicer, _Request, Context], AsyncIterator[Any]]:
    """The handler of one RPC: for one endpoint, or (None) for the one the
    request's kind names, with the request's content type."""

    async def handle(
        self: InferenceServicer, request: _Request, context: Context
    ) -> AsyncIterator[Any]:
        try:
            if endpoint is None:
                generic = cast(inference_pb2.InferenceRequest, request)
                life = serve_request(
                    self.core, endpoint_of(generic.kind), request.body, request.envelope,
                    generic.content_type,
                )  # fmt: skip
            else:
                life = serve_request(self.core, endpoint, request.body, request.envelope)
            async with contextlib.aclosing(life) as outputs:
                async for output in outputs:
                    message = response_cls(chunks=output.chunks)
                    copy_usage(output, message.usage)
                    if output.content_type and endpoint is None:  # InferenceResponse's field
                        message.content_type = output.content_type
                    yield message
        except RequestFailed as failed:
            context.set_trailing_metadata(((ERROR_METADATA_KEY, failed.error.SerializeToString()),))
            await context.abort(failed.code, failed.error.message)

    return handle


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    """One engine behind every endpoint InferenceKind names."""

    def __init__(self, engine: Engine, load: Load, queue: RequestQueue | None = None):
        self.core = AgentCore(engine, load, queue or RequestQueue(QueueLimits(), load))

    ChatCompletion = _handler(Endpoint.CHAT, inference_pb2.ChatCompletionResponse)  # type: ignore[assignment]
    Completion = _handler(Endpoint.COMPLETIONS, inference_pb2.CompletionResponse)  # type: ignore[assignment]
    Embedding = _handler(Endpoint.EMBEDDINGS, inference_pb2.EmbeddingResponse)  # type: ignore[assignment]

    # Any kind, the three above included.
    Inference = _handler(None, inference_pb2.InferenceResponse)  # type: ignore[assignment]

    async def Multiplex(
        self,
        request_iterator: AsyncIterator[inference_pb2.MultiplexRequest],
        context: Context,
    ) -> AsyncIterator[inference_pb2.MultiplexResponse]:
        session = MultiplexSession(self.core)
        async for response in session.serve(request_iterator):
            yield response
