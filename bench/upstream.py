"""A minimal, fast OpenAI-compatible server: a load-testing tool, not an engine.

It exists so `bench/run.py` can measure what KScope's token path adds on top of
an upstream that costs almost nothing. It generates `max_tokens` copies of one
token (default 16), optionally paced, and never looks at the prompt beyond a
crude token count for `usage`.

So tests can check what reached it, every completion answer echoes a digest of
the request: the `x-upstream-body-sha256` header (SHA-256 of the exact body
bytes received), and a `kscope_echo` object (that digest, `max_tokens`, `model`
and the number of chat messages) at the top of a JSON answer or in the first
chunk of a stream.

`/v1/audio/transcriptions` and `/v1/audio/translations` take a multipart
upload (parsed by python-multipart, through Starlette) and answer with what
arrived: `text`, and a `kscope_echo` of the body's digest, its Content-Type,
the text fields, and each file's field, name, content type, size and SHA-256.
With the form field `stream=true` the same comes as SSE `data:` chunks, then
`[DONE]`; with `response_format` text, srt or vtt, only the text, as
text/plain (text/vtt for vtt), as OpenAI answers those.

Served by uvicorn (uvloop, httptools, no access log) as a raw ASGI app with
orjson; no framework sits on the hot path.

    python bench/upstream.py --port 0 --port-file /tmp/port \
        [--first-token-delay-ms 50 --token-interval-ms 10] \
        [--ssl-certfile cert.pem --ssl-keyfile key.pem]   # https, for TLS tests
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import logging
import os
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import uvicorn
import uvloop
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import Request

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Json = dict[str, Any]

logger = logging.getLogger(__name__)

TOKEN_TEXT = " tok"
DEFAULT_MAX_TOKENS = 16
MAX_BODY_BYTES = 32 * 1024 * 1024
JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
]
DONE_EVENT = b"data: [DONE]\n\n"
BREAK_MARKER = b"kscope-test-break-stream"
"""A request whose body holds this gets three events, then its connection is
dropped (what a crashing engine looks like to its client): for tests."""
ECHO_HEADER = b"x-upstream-body-sha256"
ECHO_FIELD = "kscope_echo"
SENT = {"events": 0}
"""Stream events sent so far (GET /stats): tests watch generation pause."""


class EngineCrash(RuntimeError):
    """Raised mid-response on purpose: uvicorn then drops the connection."""


@dataclass(frozen=True)
class Pacing:
    """How fast the fake model "generates"."""

    first_token_delay_s: float = 0.0
    """Wait before the first token (and before the response headers)."""
    token_interval_s: float = 0.0
    """Wait between consecutive tokens; 0 sends every chunk back to back."""


@dataclass(frozen=True)
class Settings:
    """Command-line settings of the upstream."""

    host: str
    """Address to bind."""
    port: int
    """Port to bind; 0 picks a free one."""
    port_file: Path | None
    """Where to write the bound port (atomically) once listening."""
    model: str
    """Model id listed by /v1/models."""
    pacing: Pacing
    """Generation pacing."""
    ssl_certfile: Path | None = None
    """Serve https with this certificate (PEM, chain first); plain http without."""
    ssl_keyfile: Path | None = None
    """The certificate's private key (PEM)."""


class BadRequestError(Exception):
    """The request body is not something we can answer."""


@dataclass(frozen=True)
class Completion:
    """What one request asks for, reduced to what this server honours."""

    chat: bool
    model: str
    max_tokens: int
    prompt_tokens: int
    stream: bool
    include_usage: bool
    echo: Json
    """What this server received: `kscope_echo` of the answer."""


_ids = itertools.count(1)


def parse_completion(body: bytes, chat: bool) -> Completion:
    """Reduce a chat or completions request body to a `Completion`."""
    try:
        req = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequestError(f"invalid JSON: {exc}") from exc
    if not isinstance(req, dict):
        raise BadRequestError("request body must be a JSON object")
    max_tokens = req.get("max_tokens")
    if max_tokens is None:
        max_tokens = req.get("max_completion_tokens", DEFAULT_MAX_TOKENS)
    if not isinstance(max_tokens, int) or max_tokens < 0:
        raise BadRequestError("max_tokens must be a non-negative integer")
    options = req.get("stream_options") or {}
    prompt = req.get("messages") if chat else req.get("prompt")
    model = str(req.get("model", "bench"))
    return Completion(
        chat=chat,
        model=model,
        max_tokens=max_tokens,
        # Crude on purpose: about four bytes per token.
        prompt_tokens=max(1, len(orjson.dumps(prompt)) // 4),
        stream=bool(req.get("stream", False)),
        include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
        echo={
            "sha256": body_digest(body),
            "max_tokens": max_tokens,
            "model": model,
            "n_messages": len(prompt) if chat and isinstance(prompt, list) else 0,
        },
    )


def body_digest(body: bytes) -> str:
    """SHA-256 (hex) of a request body exactly as it arrived."""
    return hashlib.sha256(body).hexdigest()


def usage_of(c: Completion) -> Json:
    return {
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.max_tokens,
        "total_tokens": c.prompt_tokens + c.max_tokens,
    }


def full_response(c: Completion) -> Json:
    """The non-streaming response object."""
    text = TOKEN_TEXT * c.max_tokens
    created = int(time.time())
    if c.chat:
        choice: Json = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": "length",
        }
        rid, obj = f"chatcmpl-bench-{next(_ids)}", "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}
        rid, obj = f"cmpl-bench-{next(_ids)}", "text_completion"
    return {
        "id": rid,
        "object": obj,
        "created": created,
        "model": c.model,
        "choices": [choice],
        "usage": usage_of(c),
        ECHO_FIELD: c.echo,
    }


def _event(obj: Json) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def stream_events(c: Completion) -> Iterator[bytes]:
    """Yield the SSE events of one stream, in order, one per token plus framing.

    Chat: a role chunk, then one chunk per token, then a finish chunk, then
    (with `include_usage`) a usage chunk, then `[DONE]`. Completions: one
    chunk per token, a finish chunk, the usage chunk, `[DONE]`. The first
    chunk also carries `kscope_echo`.
    """
    head: Json = {
        "id": f"{'chatcmpl' if c.chat else 'cmpl'}-bench-{next(_ids)}",
        "object": "chat.completion.chunk" if c.chat else "text_completion",
        "created": int(time.time()),
        "model": c.model,
    }
    if c.include_usage:
        head["usage"] = None

    def chunk(delta: Json | str | None, finish: str | None, first: bool = False) -> bytes:
        if c.chat:
            choice: Json = {"index": 0, "delta": delta or {}, "logprobs": None}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None}
        choice["finish_reason"] = finish
        extra = {ECHO_FIELD: c.echo} if first else {}
        return _event({**head, "choices": [choice], **extra})

    token_delta: Json | str = {"content": TOKEN_TEXT} if c.chat else TOKEN_TEXT
    if c.chat:
        yield chunk({"role": "assistant", "content": ""}, None, first=True)
    elif c.max_tokens:
        yield chunk(token_delta, None, first=True)
    token = chunk(token_delta, None)
    for _ in range(c.max_tokens - (0 if c.chat else 1)):
        yield token
    yield chunk(None, "length", first=not c.chat and not c.max_tokens)
    if c.include_usage:
        yield _event({**head, "choices": [], "usage": usage_of(c)})
    yield DONE_EVENT


async def read_body(receive: Receive) -> bytes:
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionError("client went away")
        part: bytes = message.get("body", b"")
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise BadRequestError("request body too large")
        parts.append(part)
        if not message.get("more_body", False):
            return b"".join(parts)


async def send_json(
    send: Send, status: int, obj: Json, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send(
        {"type": "http.response.start", "status": status, "headers": JSON_HEADERS + (headers or [])}
    )
    await send({"type": "http.response.body", "body": orjson.dumps(obj)})


def error_body(message: str, kind: str) -> Json:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


async def send_stream(send: Send, c: Completion, pacing: Pacing, crash: bool = False) -> None:
    """Send the events one `send` call each, sleeping between tokens if paced."""
    if pacing.first_token_delay_s:
        await asyncio.sleep(pacing.first_token_delay_s)
    echo = [(ECHO_HEADER, str(c.echo["sha256"]).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS + echo})
    interval = pacing.token_interval_s
    body = "http.response.body"
    for index, event in enumerate(stream_events(c)):
        # Sleep before every token after the first (index 0 is the chat role chunk).
        if interval and 0 < index - c.chat < c.max_tokens:
            await asyncio.sleep(interval)
        await send({"type": body, "body": event, "more_body": True})
        SENT["events"] += 1
        if crash and index == 2:
            raise EngineCrash("dropping the connection mid-stream, as asked")
    await send({"type": body, "body": b"", "more_body": False})


async def answer_completion(receive: Receive, send: Send, chat: bool, pacing: Pacing) -> None:
    echo: list[tuple[bytes, bytes]] = []
    try:
        body = await read_body(receive)
        echo = [(ECHO_HEADER, body_digest(body).encode())]
        c = parse_completion(body, chat)
    except BadRequestError as exc:
        await send_json(send, 400, error_body(str(exc), "invalid_request_error"), echo)
        return
    if c.stream:
        await send_stream(send, c, pacing, crash=BREAK_MARKER in body)
        return
    generation_s = pacing.first_token_delay_s + pacing.token_interval_s * max(0, c.max_tokens - 1)
    if generation_s:
        await asyncio.sleep(generation_s)
    await send_json(send, 200, full_response(c), echo)


async def answer_audio(scope: Scope, receive: Receive, send: Send, task: str) -> None:
    """An OpenAI audio endpoint that reports what its multipart upload held."""
    body = await read_body(receive)
    replay = [{"type": "http.request", "body": body, "more_body": False}]

    async def again() -> Message:
        return replay.pop() if replay else {"type": "http.disconnect"}

    content_type = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
    try:
        form = await Request(scope, again).form()
    except MultiPartException as exc:
        await send_json(
            send, 400, error_body(f"bad multipart body: {exc}", "invalid_request_error")
        )
        return
    fields: Json = {}
    files: list[Json] = []
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            data = await value.read()
            files.append({
                "field": name, "filename": value.filename, "content_type": value.content_type,
                "size": len(data), "sha256": body_digest(data),
            })  # fmt: skip
        else:
            fields[name] = value
    echo = {"task": task, "sha256": body_digest(body), "content_type": content_type,
            "fields": fields, "files": files}  # fmt: skip
    text = f"{task} of {', '.join(f['filename'] or '' for f in files)}"
    if str(fields.get("stream", "")).lower() == "true":
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        for event in (_event({"type": "transcript.text.delta", "delta": text}),
                      _event({"type": "transcript.text.done", "text": text, ECHO_FIELD: echo}),
                      DONE_EVENT):  # fmt: skip
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    if fields.get("response_format") in ("text", "srt", "vtt"):
        # As OpenAI answers these: the text itself, not JSON.
        media = b"text/vtt" if fields["response_format"] == "vtt" else b"text/plain; charset=utf-8"
        headers = [(b"content-type", media)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": text.encode() + b"\n"})
        return
    await send_json(send, 200, {"text": text, ECHO_FIELD: echo})


def create_app(settings: Settings) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """Build the ASGI app: routes on (method, path), nothing else."""
    models = {
        "object": "list",
        "data": [{"id": settings.model, "object": "model", "created": 0, "owned_by": "bench"}],
    }

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if method == "POST" and path == "/v1/chat/completions":
            await answer_completion(receive, send, True, settings.pacing)
        elif method == "POST" and path == "/v1/completions":
            await answer_completion(receive, send, False, settings.pacing)
        elif method == "POST" and path in ("/v1/audio/transcriptions", "/v1/audio/translations"):
            await answer_audio(scope, receive, send, path.rsplit("/", 1)[1])
        elif method == "GET" and path == "/v1/models":
            await send_json(send, 200, models)
        elif method == "GET" and path == "/health":
            await send_json(send, 200, {"status": "ok"})
        elif method == "GET" and path == "/stats":
            await send_json(send, 200, {"events_sent": SENT["events"]})
        else:
            await send_json(send, 404, error_body(f"no route {method} {path}", "not_found"))

    return app


def bind(host: str, port: int) -> socket.socket:
    """Bind and listen ourselves, so port 0 works and the port is known at once."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def write_port_file(path: Path, port: int) -> None:
    """Write the port atomically: a reader sees either nothing or the whole number."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(f"{port}\n")
    os.replace(tmp, path)


async def serve(settings: Settings) -> None:
    sock = bind(settings.host, settings.port)
    port = sock.getsockname()[1]
    if settings.port_file is not None:
        write_port_file(settings.port_file, port)
    config = uvicorn.Config(
        create_app(settings),
        loop="uvloop",
        http="httptools",
        ws="none",
        lifespan="off",
        access_log=False,
        log_level="warning",
        backlog=4096,
        timeout_graceful_shutdown=2,
        ssl_certfile=settings.ssl_certfile,
        ssl_keyfile=settings.ssl_keyfile,
    )
    scheme = "https" if settings.ssl_certfile else "http"
    logger.warning("bench upstream listening on %s://%s:%d", scheme, settings.host, port)
    await uvicorn.Server(config).serve(sockets=[sock])


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--port-file", type=Path, default=None)
    p.add_argument("--model", default="bench")
    p.add_argument("--first-token-delay-ms", type=float, default=0.0)
    p.add_argument("--token-interval-ms", type=float, default=0.0)
    p.add_argument("--ssl-certfile", type=Path, default=None)
    p.add_argument("--ssl-keyfile", type=Path, default=None)
    a = p.parse_args(argv)
    return Settings(
        host=a.host,
        port=a.port,
        port_file=a.port_file,
        model=a.model,
        pacing=Pacing(a.first_token_delay_ms / 1000, a.token_interval_ms / 1000),
        ssl_certfile=a.ssl_certfile,
        ssl_keyfile=a.ssl_keyfile,
    )


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    uvloop.run(serve(parse_args(argv)))


if __name__ == "__main__":
    main()
