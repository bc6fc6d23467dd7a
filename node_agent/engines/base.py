"""What every engine offers the agent's servicer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import orjson

from kscope.v1 import inference_pb2


class Endpoint(StrEnum):
    """The engine paths the agent forwards to, relative to the engine's root
    (vLLM serves the /v1 ones and the others side by side). Only these: the
    facade names an endpoint by its InferenceKind, never by a path."""

    CHAT = "/v1/chat/completions"
    COMPLETIONS = "/v1/completions"
    EMBEDDINGS = "/v1/embeddings"
    RESPONSES = "/v1/responses"
    TOKENIZE = "/tokenize"
    DETOKENIZE = "/detokenize"
    SCORE = "/score"
    SCORE_V1 = "/v1/score"
    RERANK = "/rerank"
    RERANK_V1 = "/v1/rerank"
    RERANK_V2 = "/v2/rerank"
    POOLING = "/pooling"
    CLASSIFY = "/classify"
    TRANSCRIPTIONS = "/v1/audio/transcriptions"
    TRANSLATIONS = "/v1/audio/translations"

    @property
    def whole_events(self) -> bool:
        """Its stream's SSE events are forwarded whole (`event:` lines and
        all), not as `data:` payloads: the Responses API names every event."""
        return self is Endpoint.RESPONSES

    @property
    def json_only(self) -> bool:
        """OpenAI's JSON endpoints (chat, completions, embeddings): a one-piece
        answer is JSON whatever an engine labels it, on every transport (their
        per-call RPCs carry no content type)."""
        return self in _JSON_ONLY


_JSON_ONLY = frozenset({Endpoint.CHAT, Endpoint.COMPLETIONS, Endpoint.EMBEDDINGS})


@dataclass(slots=True)
class EngineRequest:
    """One request as the agent hands it to its engine (read-only by
    convention: not frozen, because a frozen dataclass costs a microsecond
    more to build, once per request on the token path)."""

    endpoint: Endpoint
    body: bytes
    """The client's body, unchanged (or with usage asked for, usage_request.py)."""
    stream: bool = False
    request_id: str = ""
    """The facade's id for the request (the client's X-Request-Id, or its own):
    sent to the engine as X-Request-Id, so the engine's log lines carry it."""
    content_type: str = ""
    """The body's Content-Type as the client sent it; "" is application/json."""


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


@dataclass(slots=True)
class EngineOutput:
    """Some OpenAI JSON objects from the engine: the whole body when not
    streaming, or the stream events that arrived together. Not frozen: one is
    made per engine read, and a frozen dataclass costs a microsecond more."""

    chunks: list[bytes]
    usage: Usage | None = None
    content_type: str = ""
    """A one-piece answer's Content-Type when it is not JSON (empty: JSON)."""


def copy_usage(output: EngineOutput, target: inference_pb2.Usage) -> None:
    """Put an output's usage (if it carries one) into a response's typed Usage."""
    if output.usage is not None:
        target.prompt_tokens = output.usage.prompt_tokens
        target.completion_tokens = output.usage.completion_tokens
        target.total_tokens = output.usage.total_tokens


class EngineError(Exception):
    """The engine refused or failed a request. `body` is an OpenAI error object
    (JSON bytes) when the engine sent one; otherwise one is made from the message
    and the OpenAI `type`, `param` and `code` given here."""

    def __init__(
        self,
        http_status: int,
        message: str,
        body: bytes = b"",
        *,
        error_type: str = "engine_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.http_status = http_status
        self.message = message
        self.body = body
        self.error_type = error_type
        self.param = param
        self.code = code

    def openai_error(self) -> bytes:
        """The engine's OpenAI error object, or one made from the message."""
        return self.body or orjson.dumps(
            {"message": self.message, "type": self.error_type, "param": self.param,
             "code": self.code}
        )  # fmt: skip


class EngineUnavailable(EngineError):
    """The engine cannot be reached (not started, crashed, or overloaded)."""

    def __init__(self, message: str):
        super().__init__(503, message)


class Engine(Protocol):
    """An OpenAI-compatible engine the agent serves requests with."""

    kind: str
    url: str
    """The engine's own OpenAI base URL, for operators ("" when in process)."""

    async def start(self) -> None:
        """Begin starting (spawn processes); return without waiting for readiness."""
        ...

    async def healthy(self) -> bool:
        """Whether the engine can take requests now."""
        ...

    def failure(self) -> str:
        """Why the engine can never become healthy (it exited), or ""."""
        ...

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Run one request. Closing the iterator aborts the engine's request."""
        ...

    async def stop(self) -> None:
        """Stop the engine and release everything it holds."""
        ...
