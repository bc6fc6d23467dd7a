"""The inference endpoints the facade proxies, and what it checks in a body.

Each endpoint is one `EndpointKind`: the client's path, the InferenceKind that
names it to the agent (the agent alone knows the engine's path), the per-call
RPC that carries it, and what the gateway itself must read from the body: the
model (to route and to check the key's grant) and whether it streams. Every
other field is the engine's to judge, so the body goes on as the same bytes.

Paths outside /v1 are vLLM's own (it serves /tokenize, /pooling, /rerank …
beside /v1); the facade checks keys on them as on /v1 (facade/app.py).

Audio bodies are multipart/form-data: the model and stream flag are form
fields, found by scanning the part headers (bytes.find, in C) without copying
the uploaded file; the Content-Type, boundary and all, goes to the engine with
the body.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import orjson

from facade.errors import ApiError
from kscope.v1 import inference_pb2
from kscope_common.multipart import NotMultipart, boundary_of, parts


class EndpointKind:
    """What differs between the inference endpoints."""

    __slots__ = (
        "accepted", "form", "kind", "path", "request_cls", "required", "rpc", "streams",
        "whole_events",
    )  # fmt: skip

    def __init__(
        self,
        path: str,
        kind: int,
        *,
        rpc: str = "Inference",
        request_cls: Callable[..., Any] | None = None,
        required: str = "",
        accepted: tuple[type, ...] = (),
        streams: bool = False,
        whole_events: bool = False,
        form: bool = False,
    ):
        self.path = path
        """The client's path (also the endpoint label of usage records)."""
        self.kind = kind
        """The InferenceKind the agent knows it by."""
        self.rpc = rpc
        """The per-call RPC: the three first endpoints keep their own; the
        others go through the generic `Inference`."""
        self.request_cls = request_cls
        """The RPC's request message, when it is not InferenceRequest."""
        self.required = required
        """A field the gateway checks ("" for none) and the types it may have."""
        self.accepted = accepted
        self.streams = streams
        self.whole_events = whole_events
        """The stream's SSE events pass whole (`event:` lines and all) and end
        as the engine ends them (no `data: [DONE]` of ours): the Responses API."""
        self.form = form
        """The body is multipart/form-data (audio uploads), not JSON."""

    def request(
        self, envelope: inference_pb2.RequestEnvelope, body: bytes, content_type: str
    ) -> Any:
        """The message for the per-call RPC (the Multiplex open takes its parts)."""
        if self.request_cls is not None:
            return self.request_cls(envelope=envelope, body=body)
        return inference_pb2.InferenceRequest(
            kind=self.kind,  # type: ignore[arg-type]
            envelope=envelope,
            body=body,
            content_type=content_type,
        )


def _kinds(*kinds: EndpointKind) -> dict[str, EndpointKind]:
    return {kind.path: kind for kind in kinds}


_TEXT = (str, list)
KINDS = _kinds(
    EndpointKind(
        "/v1/chat/completions", inference_pb2.INFERENCE_KIND_CHAT_COMPLETION,
        rpc="ChatCompletion", request_cls=inference_pb2.ChatCompletionRequest,
        required="messages", accepted=(list,), streams=True,
    ),
    EndpointKind(
        "/v1/completions", inference_pb2.INFERENCE_KIND_COMPLETION,
        rpc="Completion", request_cls=inference_pb2.CompletionRequest,
        required="prompt", accepted=_TEXT, streams=True,
    ),
    EndpointKind(
        "/v1/embeddings", inference_pb2.INFERENCE_KIND_EMBEDDING,
        rpc="Embedding", request_cls=inference_pb2.EmbeddingRequest,
        required="input", accepted=_TEXT,
    ),
    EndpointKind(
        "/v1/responses", inference_pb2.INFERENCE_KIND_RESPONSE, streams=True, whole_events=True
    ),
    EndpointKind("/tokenize", inference_pb2.INFERENCE_KIND_TOKENIZE),
    EndpointKind("/detokenize", inference_pb2.INFERENCE_KIND_DETOKENIZE),
    EndpointKind("/score", inference_pb2.INFERENCE_KIND_SCORE),
    EndpointKind("/v1/score", inference_pb2.INFERENCE_KIND_SCORE_V1),
    EndpointKind("/rerank", inference_pb2.INFERENCE_KIND_RERANK),
    EndpointKind("/v1/rerank", inference_pb2.INFERENCE_KIND_RERANK_V1),
    EndpointKind("/v2/rerank", inference_pb2.INFERENCE_KIND_RERANK_V2),
    EndpointKind("/pooling", inference_pb2.INFERENCE_KIND_POOLING),
    EndpointKind("/classify", inference_pb2.INFERENCE_KIND_CLASSIFY),
    EndpointKind(
        "/v1/audio/transcriptions", inference_pb2.INFERENCE_KIND_TRANSCRIPTION,
        streams=True, form=True,
    ),
    EndpointKind(
        "/v1/audio/translations", inference_pb2.INFERENCE_KIND_TRANSLATION,
        streams=True, form=True,
    ),
)  # fmt: skip
"""Every endpoint the proxy serves, by the client's path (POST only)."""


class Parsed(NamedTuple):
    model: str
    stream: bool
    request: dict[str, Any] | None
    """The parsed JSON body (for the capability check); None for a form."""


def parse_request(
    body: bytes, kind: EndpointKind, default_model: str = "", content_type: bytes = b""
) -> Parsed:
    """Validate what the gateway itself needs; return the model, whether to
    stream and the parsed body. Every other field goes to the engine unchanged,
    and the engine judges it. `default_model` stands in for a missing model."""
    if kind.form:
        return _parse_form(body, kind, default_model, content_type)
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
    if kind.required:
        value = request.get(kind.required)
        if value is None:
            raise ApiError(400, f"'{kind.required}' is required", param=kind.required)
        if not isinstance(value, kind.accepted):
            names = " or ".join("array" if t is list else "string" for t in kind.accepted)
            raise ApiError(400, f"'{kind.required}' must be {names}", param=kind.required)
    return Parsed(model, stream, request)


def content_type_of(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The request's Content-Type header, as the client sent it (b"" without one)."""
    for name, value in headers:
        if name == b"content-type":
            return value
    return b""


def _parse_form(body: bytes, kind: EndpointKind, default_model: str, content_type: bytes) -> Parsed:
    boundary = boundary_of(content_type)
    if boundary is None:
        raise ApiError(
            400, f"{kind.path} takes a multipart/form-data body (with a boundary)",
            code="invalid_content_type",
        )  # fmt: skip
    fields = form_fields(body, boundary, (b"model", b"stream"))
    try:
        model = fields.get(b"model", b"").decode() or default_model
    except UnicodeDecodeError:
        model = ""
    if not model:
        raise ApiError(400, "'model' is required and must be a non-empty string", param="model")
    stream_field = fields.get(b"stream", b"false").strip().lower()
    if stream_field not in (b"true", b"false", b"1", b"0", b""):
        raise ApiError(400, "'stream' must be a boolean", param="stream")
    return Parsed(model, stream_field in (b"true", b"1"), None)


def form_fields(body: bytes, boundary: bytes, names: tuple[bytes, ...]) -> dict[bytes, bytes]:
    """The values of the text fields called `names` in a multipart/form-data
    body (file parts are skipped, never copied). ApiError(400) for a body that
    is not multipart with this boundary."""
    found: dict[bytes, bytes] = {}
    try:
        for part in parts(body, boundary):
            if part.name in names and part.name not in found:
                found[part.name] = body[part.start : part.end]
    except NotMultipart:
        raise _not_form() from None
    return found


def _not_form() -> ApiError:
    return ApiError(
        400, "request body is not multipart/form-data with the boundary its Content-Type names",
        code="invalid_multipart",
    )  # fmt: skip
