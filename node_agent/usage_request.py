"""Exact token counts for every request: the engine is always asked for usage.

A streaming chat or completion request whose client did not ask for
`stream_options.include_usage` gets it added on the way to the engine, and the
usage chunk the engine then sends last is taken out of what the client sees
(its figures still reach the accounting). So no count depends on counting
chunks, and the client gets the bytes it would have got from the engine.
"""

from __future__ import annotations

import orjson

from node_agent.engines.base import EngineOutput

_OPTION = b'"stream_options"'
_ADDED = b',"stream_options":{"include_usage":true}}'
_NULL = b'"usage":null'
_COMMA_NULL = b"," + _NULL
_NULL_COMMA = _NULL + b","


def ask_for_usage(body: bytes) -> tuple[bytes, bool]:
    """(the body to send the engine, whether usage was asked for on the client's behalf).

    The common case (no stream_options at all) appends the option to the
    client's bytes without parsing them; a body that has stream_options
    without include_usage is parsed and written again.
    """
    if _OPTION not in body:
        start, end = body.find(b"{"), body.rfind(b"}")
        if start < 0 or end <= start or body[:start].strip() or body[end + 1 :].strip():
            return body, False  # not an object: the engine will say so
        if not body[start + 1 : end].strip():
            return body[:end] + _ADDED[1:], True
        return body[:end].rstrip() + _ADDED, True
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body, False
    options = request.get("stream_options") if isinstance(request, dict) else None
    if options is None:
        options = {}
    if not isinstance(options, dict) or options.get("include_usage"):
        return body, False  # the client asked (or sent something the engine will refuse)
    request["stream_options"] = {**options, "include_usage": True}
    return orjson.dumps(request), True


def without_usage_chunk(output: EngineOutput) -> EngineOutput:
    """The output as the client would have had it without include_usage: no
    usage-only chunk (empty `choices`; its usage kept for the accounting), and
    no `"usage":null` that some servers (OpenAI's own) add to every other chunk.
    Runs for every output of such a request: the common cases test once."""
    chunks = output.chunks
    if output.usage is None:
        if len(chunks) == 1:
            chunk = chunks[0]
            if _NULL not in chunk:
                return output
            return EngineOutput([_without_null_usage(chunk)])
        if not any(_NULL in c for c in chunks):
            return output
        return EngineOutput([_without_null_usage(c) for c in chunks])
    kept = [_without_null_usage(c) for c in chunks if not (b'"usage"' in c and _usage_only(c))]
    return EngineOutput(kept, output.usage)


def _without_null_usage(chunk: bytes) -> bytes:
    if _NULL not in chunk:
        return chunk
    return chunk.replace(_COMMA_NULL, b"").replace(_NULL_COMMA, b"")


def _usage_only(chunk: bytes) -> bool:
    try:
        event = orjson.loads(chunk)
    except orjson.JSONDecodeError:
        return False
    return isinstance(event, dict) and not event.get("choices") and event.get("usage") is not None
