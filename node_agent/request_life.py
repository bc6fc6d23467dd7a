"""One request's life in the agent, from admission to its last chunk.

Both transports (one gRPC call per request, and the Multiplex stream) run
`serve_request` and only encode what it yields: the draining check, the
request's clock, its queue slot, the engine call, the mapping of every failure
to one `RequestError`, and its accounting live here once. Cancelling the
consumer (the client left) cancels the engine request and counts it as such.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import grpc

from kscope.v1 import inference_pb2
from kscope_common.errors import grpc_code_for_http
from kscope_common.request_stats import CANCELLED
from node_agent.engines.base import Endpoint, Engine, EngineError, EngineOutput, EngineRequest
from node_agent.load import Load, RequestClock
from node_agent.queue import RequestQueue
from node_agent.usage_request import ask_for_usage, without_usage_chunk

log = logging.getLogger(__name__)

_STREAMED_WITH_USAGE = frozenset({Endpoint.CHAT, Endpoint.COMPLETIONS})
"""Endpoints whose streams can end with a usage chunk."""

ENDPOINTS = {
    inference_pb2.INFERENCE_KIND_CHAT_COMPLETION: Endpoint.CHAT,
    inference_pb2.INFERENCE_KIND_COMPLETION: Endpoint.COMPLETIONS,
    inference_pb2.INFERENCE_KIND_EMBEDDING: Endpoint.EMBEDDINGS,
    inference_pb2.INFERENCE_KIND_RESPONSE: Endpoint.RESPONSES,
    inference_pb2.INFERENCE_KIND_TOKENIZE: Endpoint.TOKENIZE,
    inference_pb2.INFERENCE_KIND_DETOKENIZE: Endpoint.DETOKENIZE,
    inference_pb2.INFERENCE_KIND_SCORE: Endpoint.SCORE,
    inference_pb2.INFERENCE_KIND_SCORE_V1: Endpoint.SCORE_V1,
    inference_pb2.INFERENCE_KIND_RERANK: Endpoint.RERANK,
    inference_pb2.INFERENCE_KIND_RERANK_V1: Endpoint.RERANK_V1,
    inference_pb2.INFERENCE_KIND_RERANK_V2: Endpoint.RERANK_V2,
    inference_pb2.INFERENCE_KIND_POOLING: Endpoint.POOLING,
    inference_pb2.INFERENCE_KIND_CLASSIFY: Endpoint.CLASSIFY,
    inference_pb2.INFERENCE_KIND_TRANSCRIPTION: Endpoint.TRANSCRIPTIONS,
    inference_pb2.INFERENCE_KIND_TRANSLATION: Endpoint.TRANSLATIONS,
}
"""Each kind a facade may ask for, and the one engine path it means."""


class RequestFailed(Exception):
    """The request ended with an error; `error` is what the facade is told."""

    def __init__(self, error: inference_pb2.RequestError):
        super().__init__(error.message)
        self.error = error

    @property
    def code(self) -> grpc.StatusCode:
        return _CODES.get(self.error.grpc_code, grpc.StatusCode.UNKNOWN)


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def agent_error(code: grpc.StatusCode, message: str) -> RequestFailed:
    """A failure of the agent's own (draining, an unknown kind, a bug)."""
    return RequestFailed(inference_pb2.RequestError(grpc_code=code.value[0], message=message))


def endpoint_of(kind: int) -> Endpoint:
    """The engine endpoint of an InferenceKind; RequestFailed(INVALID_ARGUMENT)
    for one this agent does not know."""
    endpoint: Endpoint | None = ENDPOINTS.get(kind)  # type: ignore[call-overload]
    if endpoint is None:
        raise agent_error(grpc.StatusCode.INVALID_ARGUMENT, f"unknown kind {kind}")
    return endpoint


def engine_error(exc: EngineError) -> RequestFailed:
    """The engine's answer (its HTTP status and OpenAI error object), as it is."""
    return RequestFailed(
        inference_pb2.RequestError(
            grpc_code=grpc_code_for_http(exc.http_status).value[0],
            message=exc.message,
            http_status=exc.http_status,
            error_body=exc.openai_error(),
        )
    )


@dataclass(frozen=True)
class AgentCore:
    """What every request needs: the engine, the load figures, the queue."""

    engine: Engine
    load: Load
    queue: RequestQueue


async def serve_request(
    core: AgentCore,
    endpoint: Endpoint,
    body: bytes,
    envelope: inference_pb2.RequestEnvelope,
    content_type: str = "",
) -> AsyncGenerator[EngineOutput, None]:
    """The engine's outputs for one request; RequestFailed for any failure.
    Iterate it under `contextlib.aclosing` so leaving early ends it at once."""
    if core.load.draining:
        raise agent_error(grpc.StatusCode.UNAVAILABLE, "agent is draining")
    clock = RequestClock(core.load.stats, envelope.stream)
    status = CANCELLED
    try:
        # The queue counts this request as queued, then in flight.
        async with core.queue.slot(envelope.caller, envelope.priority):
            # Closed here, at once, when the consumer leaves (the client went
            # away): that is what aborts the engine's request.
            asked = False
            if envelope.stream and endpoint in _STREAMED_WITH_USAGE:
                body, asked = ask_for_usage(body)  # exact token counts (usage_request.py)
            request = EngineRequest(
                endpoint, body, envelope.stream, envelope.request_id, content_type
            )
            generation = core.engine.generate(request)
            async with contextlib.aclosing(generation) as outputs:  # type: ignore[type-var]
                async for output in outputs:
                    clock.saw(output)
                    yield without_usage_chunk(output) if asked else output
        status = 200
    except EngineError as exc:
        status = exc.http_status
        log.info("request %s failed in the engine: %s", envelope.request_id, exc.message)
        raise engine_error(exc) from exc
    except Exception as exc:  # an engine bug fails its request; it must not hang it
        status = 500
        log.exception("request %s failed unexpectedly", envelope.request_id)
        raise agent_error(grpc.StatusCode.INTERNAL, "the engine failed unexpectedly") from exc
    finally:
        clock.end(status)
