"""Pure pieces of the token path: SSE splitting, usage extraction, request checks,
the error table."""

from __future__ import annotations

import grpc
import orjson
import pytest

from facade.endpoints import KINDS, form_fields, parse_request
from facade.errors import ApiError
from kscope_common.errors import grpc_code_for_http, http_for_grpc
from kscope_common.multipart import boundary_of
from node_agent.engines.base import Usage
from node_agent.engines.openai_upstream import (
    renamed_form,
    split_events,
    split_whole_events,
    usage_of,
)


def test_split_events_keeps_incomplete_rest() -> None:
    payloads, rest = split_events(b'data: {"a":1}\n\ndata: {"b":2}\n\ndata: {"c"')
    assert payloads == [b'{"a":1}', b'{"b":2}']
    assert rest == b'data: {"c"'


def test_split_events_handles_crlf_comments_and_multiline() -> None:
    payloads, rest = split_events(b": ping\r\n\r\ndata: x\r\ndata: y\r\n\r\ndata: [DONE]\n\n")
    assert payloads == [b"x\ny", b"[DONE]"]
    assert rest == b""


def test_usage_of_stream_chunk_and_body() -> None:
    chunk = b'{"choices":[],"usage":{"prompt_tokens":7,"total_tokens":12,"completion_tokens":5}}'
    assert usage_of(chunk) == Usage(7, 5, 12)
    assert usage_of(b'{"choices":[{"x":1}],"usage":null}') is None
    assert usage_of(b'{"choices":[]}') is None
    spaced = b'{"usage": {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3}}'
    assert usage_of(spaced) == Usage(3, 0, 3)


CHAT = KINDS["/v1/chat/completions"]
EMBED = KINDS["/v1/embeddings"]


@pytest.mark.parametrize(
    ("body", "param", "status"),
    [
        (b"{nope", None, 400),
        (b"[1, 2]", None, 400),
        (b"{}", "model", 400),
        (b'{"model": 3, "messages": []}', "model", 400),
        (b'{"model": "m"}', "messages", 400),
        (b'{"model": "m", "messages": "hi"}', "messages", 400),
        (b'{"model": "m", "messages": [], "stream": "yes"}', "stream", 400),
    ],
)
def test_parse_request_rejects(body: bytes, param: str | None, status: int) -> None:
    with pytest.raises(ApiError) as info:
        parse_request(body, CHAT)
    assert info.value.status == status
    assert info.value.param == param
    error = orjson.loads(info.value.body())["error"]
    assert set(error) == {"message", "type", "param", "code"}


def test_parse_request_accepts_and_reads_stream_flag() -> None:
    assert parse_request(b'{"model": "m", "messages": [], "stream": true}', CHAT)[:2] == ("m", True)
    assert parse_request(b'{"model": "m", "messages": [], "stream": null}', CHAT)[:2] == (
        "m",
        False,
    )
    with pytest.raises(ApiError):
        parse_request(b'{"model": "m", "input": "x", "stream": true}', EMBED)


def test_error_table_round_trips_common_statuses() -> None:
    code = grpc.StatusCode
    pairs = [(400, code.INVALID_ARGUMENT), (401, code.UNAUTHENTICATED),
             (403, code.PERMISSION_DENIED), (404, code.NOT_FOUND), (429, code.RESOURCE_EXHAUSTED),
             (503, code.UNAVAILABLE), (504, code.DEADLINE_EXCEEDED)]  # fmt: skip
    for http, status in pairs:
        assert grpc_code_for_http(http) is status
        assert http_for_grpc(status)[0] == http
    assert grpc_code_for_http(418) is grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_code_for_http(500) is grpc.StatusCode.INTERNAL


def test_multiplex_batches_keep_large_bodies_apart() -> None:
    from facade.exchange import pack_opens
    from kscope.v1 import inference_pb2

    def opened(stream_id: int, size: int) -> inference_pb2.MultiplexOpen:
        return inference_pb2.MultiplexOpen(stream_id=stream_id, body=b"x" * size)

    opens = [opened(1, 10), opened(2, 20), opened(3, 100), opened(4, 5), opened(5, 90)]
    batches = pack_opens(opens, 100)
    assert [[o.stream_id for o in b] for b in batches] == [[1, 2], [3], [4, 5]]
    assert all(sum(len(o.body) for o in b) <= 100 or len(b) == 1 for b in batches)
    assert pack_opens([], 100) == []
    assert [[o.stream_id for o in b] for b in pack_opens([opened(1, 500)], 100)] == [[1]]


async def test_opens_queued_together_never_make_one_oversized_message() -> None:
    """Eight 15 MiB bodies opened in one loop turn go out as messages under the
    budget (packed together they would pass gRPC's 64 MiB limit and fail the
    stream that every request on the agent shares)."""
    import asyncio

    from facade.exchange import MULTIPLEX_BATCH_BYTES, AgentSession
    from kscope.v1 import inference_pb2

    sent: list[inference_pb2.MultiplexRequest] = []
    done = asyncio.Event()

    class FakeCall:  # stands in for grpc.aio's stream-stream call (a seam: no agent)
        def __init__(self, requests: object) -> None:
            self._requests = requests

        def __aiter__(self) -> object:
            return self._responses()

        async def _responses(self) -> object:
            async for request in self._requests:  # type: ignore[attr-defined]
                sent.append(request)
                if sum(len(r.opens) for r in sent) == 8:
                    done.set()
            if False:  # an async generator that yields no response
                yield None

        def cancel(self) -> None:
            pass

    class FakeStub:
        def Multiplex(self, requests: object) -> FakeCall:
            return FakeCall(requests)

    session = AgentSession(FakeStub(), "fake:1")  # type: ignore[arg-type]
    body = b"x" * (15 * 1024 * 1024)
    for _ in range(8):
        session.open(1, inference_pb2.RequestEnvelope(), body, "m")
    await asyncio.wait_for(done.wait(), 5)
    assert len(sent) == 8  # each 15 MiB body alone
    assert all(m.ByteSize() < MULTIPLEX_BATCH_BYTES + 1024 * 1024 * 12 for m in sent)
    assert max(m.ByteSize() for m in sent) < 64 * 1024 * 1024
    if session._reader is not None:
        session._reader.cancel()


# ---------------------------------------------------------------- more endpoints


def test_split_whole_events_keeps_every_line_of_an_event() -> None:
    buffer = (
        b'event: response.created\r\ndata: {"a":1}\r\n\r\n'
        b'event: response.output_text.delta\ndata: {"b":2}\n\n: comment\n\nevent: resp'
    )
    events, rest = split_whole_events(buffer)
    assert events == [
        b'event: response.created\ndata: {"a":1}',
        b'event: response.output_text.delta\ndata: {"b":2}',
        b": comment",
    ]
    assert rest == b"event: resp"


def test_usage_of_a_responses_answer_reads_input_and_output_tokens() -> None:
    completed = (
        b'event: response.completed\ndata: {"response":{"output":[],"usage":{"input_tokens":16,'
        b'"input_tokens_details":{"cached_tokens":0},"output_tokens":3,'
        b'"output_tokens_details":{"reasoning_tokens":0},"total_tokens":19}},"type":"x"}'
    )
    assert usage_of(completed) == Usage(16, 3, 19)
    assert usage_of(b'{"response":{"usage":null}}') is None


def _form(*parts: tuple[bytes, bytes], boundary: bytes = b"XyZ") -> bytes:
    delimiter = b"--" + boundary
    encoded = [delimiter + b"\r\n" + h + b"\r\n\r\n" + v + b"\r\n" for h, v in parts]
    return b"".join(encoded) + delimiter + b"--\r\n"


FILE_PART = (b'Content-Disposition: form-data; name="model"; filename="model"', b"\x00\r\n--XyY")


def test_form_fields_reads_text_fields_and_skips_files() -> None:
    body = _form(
        FILE_PART,
        (b'content-disposition: form-data; name="model"', b"whisper"),
        (b'Content-Disposition: form-data; name="stream"\r\nContent-Type: text/plain', b"true"),
    )
    fields = form_fields(body, b"XyZ", (b"model", b"stream"))
    assert fields == {b"model": b"whisper", b"stream": b"true"}
    assert form_fields(body, b"XyZ", (b"language",)) == {}


@pytest.mark.parametrize(
    ("content_type", "boundary"),
    [
        (b"multipart/form-data; boundary=XyZ", b"XyZ"),
        (b'Multipart/Form-Data;charset=utf-8; Boundary="a b"', b"a b"),
        (b"multipart/form-data", None),
        (b"application/json", None),
    ],
)
def test_form_boundary(content_type: bytes, boundary: bytes | None) -> None:
    assert boundary_of(content_type) == boundary


def test_parse_request_of_a_form_reads_model_and_stream() -> None:
    audio = KINDS["/v1/audio/transcriptions"]
    kind = b"multipart/form-data; boundary=XyZ"
    body = _form(FILE_PART, (b'Content-Disposition: form-data; name="model"', b"w"))
    assert parse_request(body, audio, content_type=kind)[:2] == ("w", False)
    assert parse_request(_form(FILE_PART), audio, "dflt", kind)[:2] == ("dflt", False)
    streamed = _form((b'Content-Disposition: form-data; name="stream"', b"True"), FILE_PART)
    assert parse_request(streamed, audio, "d", kind)[:2] == ("d", True)
    with pytest.raises(ApiError) as info:
        parse_request(_form((b'Content-Disposition: form-data; name="stream"', b"yes")), audio,
                      "d", kind)  # fmt: skip
    assert info.value.param == "stream"


def test_renamed_form_replaces_only_the_model_value() -> None:
    body = _form(FILE_PART, (b'Content-Disposition: form-data; name="model"', b"public-name"))
    renamed = renamed_form(body, "multipart/form-data; boundary=XyZ", "engine-name")
    assert renamed == body.replace(b"\r\n\r\npublic-name\r\n", b"\r\n\r\nengine-name\r\n")
    assert renamed_form(body, "application/json", "x") == body


def test_the_agent_renames_the_field_the_facade_routed_by() -> None:
    # One reader for both: a field name the facade accepts (unquoted, any
    # case of the header) is the one the agent renames.
    body = _form(FILE_PART, (b"content-disposition: form-data; name=model", b"alias"))
    assert form_fields(body, b"XyZ", (b"model",)) == {b"model": b"alias"}
    renamed = renamed_form(body, "multipart/form-data; boundary=XyZ", "engine-name")
    assert renamed == body.replace(b"\r\n\r\nalias\r\n", b"\r\n\r\nengine-name\r\n")


async def test_the_upstream_gets_the_path_content_type_and_request_id() -> None:
    """What the agent's HTTP client sends, read off a socket: the endpoint's
    path under the engine's root or its /v1, the client's Content-Type and
    body as they were, and the request id as X-Request-Id."""
    import asyncio

    from node_agent.engines.base import Endpoint, EngineRequest
    from node_agent.engines.openai_upstream import OpenAIUpstream

    received: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1]) for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )  # fmt: skip
            received.append(head + await reader.readexactly(length))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 2\r\n\r\n{}")  # fmt: skip

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    upstream = OpenAIUpstream(f"http://127.0.0.1:{port}/v1", "m", api_key="k")
    form_type = "multipart/form-data; boundary=XyZ"
    requests = [
        EngineRequest(Endpoint.TOKENIZE, b'{"model":"m"}', False, "req-1"),
        EngineRequest(Endpoint.CHAT, b'{"model":"m"}', False, "client-id:7"),
        EngineRequest(Endpoint.TRANSCRIPTIONS, b"--XyZ--\r\n", False, "req-3", form_type),
        EngineRequest(Endpoint.RERANK_V2, b"{}", False, "bad\r\nInjected: 1"),
    ]
    try:
        for request in requests:
            outputs = [o async for o in upstream.generate(request)]
            assert [o.chunks for o in outputs] == [[b"{}"]]
    finally:
        await upstream.stop()
        server.close()
    assert received == [
        b"POST /tokenize HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAuthorization: Bearer k\r\n"
        b"Content-Type: application/json\r\nX-Request-Id: req-1\r\nContent-Length: 13\r\n\r\n"
        b'{"model":"m"}' % port,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAuthorization: Bearer k\r\n"
        b"Content-Type: application/json\r\nX-Request-Id: client-id:7\r\nContent-Length: 13\r\n"
        b'\r\n{"model":"m"}' % port,
        b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAuthorization: Bearer k"
        b"\r\nContent-Type: multipart/form-data; boundary=XyZ\r\nX-Request-Id: req-3\r\n"
        b"Content-Length: 9\r\n\r\n--XyZ--\r\n" % port,
        # An id that would break the header is left out, never sent.
        b"POST /v2/rerank HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAuthorization: Bearer k\r\n"
        b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}" % port,
    ]


async def test_only_an_answer_that_may_be_text_keeps_the_engines_label() -> None:
    """A chat answer is JSON whatever the engine calls it (its per-call RPC has
    no content type, so every transport must say the same); a transcription
    asked for as text keeps the engine's label."""
    import asyncio

    from node_agent.engines.base import Endpoint, EngineRequest
    from node_agent.engines.openai_upstream import OpenAIUpstream

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(2)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n"
                         b"Content-Length: 2\r\n\r\nhi")  # fmt: skip

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    upstream = OpenAIUpstream(f"http://127.0.0.1:{port}/v1", "m")
    try:
        labels = {
            endpoint: [o.content_type async for o in upstream.generate(
                EngineRequest(endpoint, b"{}", False, "", "application/json"))]
            for endpoint in (Endpoint.CHAT, Endpoint.EMBEDDINGS, Endpoint.TRANSCRIPTIONS)
        }  # fmt: skip
    finally:
        await upstream.stop()
        server.close()
    assert labels == {
        Endpoint.CHAT: [""],
        Endpoint.EMBEDDINGS: [""],
        Endpoint.TRANSCRIPTIONS: ["text/plain; charset=utf-8"],
    }


@pytest.mark.parametrize(
    ("url", "endpoint", "path"),
    [
        ("http://h/v1", "/v1/chat/completions", "/v1/chat/completions"),
        ("http://h/v1", "/pooling", "/pooling"),
        ("https://h/openai/v1/", "/v1/responses", "/openai/v1/responses"),
        ("https://h/openai/v1/", "/v2/rerank", "/openai/v2/rerank"),
        ("http://h:8000", "/v1/completions", "/completions"),  # as before: under the URL
        ("http://h:8000", "/tokenize", "/tokenize"),
    ],
)
def test_upstream_paths(url: str, endpoint: str, path: str) -> None:
    from node_agent.engines.base import Endpoint
    from node_agent.engines.openai_upstream import OpenAIUpstream

    assert OpenAIUpstream(url, "m").path_of(Endpoint(endpoint)) == path


async def test_a_responses_stream_comes_from_the_upstream_as_whole_events() -> None:
    """Read off a socket: a Responses stream's events keep their `event:` lines
    (and a [DONE], had the engine sent one); a chat stream's are data payloads."""
    import asyncio

    from node_agent.engines.base import Endpoint, EngineRequest
    from node_agent.engines.openai_upstream import OpenAIUpstream

    events = (
        b'event: response.created\ndata: {"usage":null}\n\n'
        b'event: response.completed\ndata: {"response":{"usage":{"input_tokens":2,'
        b'"output_tokens":1,"total_tokens":3}}}\n\ndata: [DONE]\n\n'
    )

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(2)
            head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d"
            writer.write(head % len(events) + b"\r\n\r\n" + events)

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    upstream = OpenAIUpstream(f"http://127.0.0.1:{port}/v1", "m")
    try:
        whole = [o async for o in upstream.generate(EngineRequest(Endpoint.RESPONSES, b"{}", True))]
        data = [o async for o in upstream.generate(EngineRequest(Endpoint.CHAT, b"{}", True))]
    finally:
        await upstream.stop()
        server.close()
    assert [c for o in whole for c in o.chunks] == [
        b'event: response.created\ndata: {"usage":null}',
        b'event: response.completed\ndata: {"response":{"usage":{"input_tokens":2,'
        b'"output_tokens":1,"total_tokens":3}}}',
        b"data: [DONE]",
    ]
    assert [o.usage for o in whole if o.usage is not None] == [Usage(2, 1, 3)]
    assert [c for o in data for c in o.chunks] == [
        b'{"usage":null}',
        b'{"response":{"usage":{"input_tokens":2,"output_tokens":1,"total_tokens":3}}}',
    ]
