"""Pure pieces of the token path: SSE splitting, usage extraction, request checks,
the error table."""

from __future__ import annotations

import grpc
import orjson
import pytest

from facade.errors import ApiError
from facade.proxy import KINDS, parse_request
from kscope_common.errors import grpc_code_for_http, http_for_grpc
from node_agent.engines.base import Usage
from node_agent.engines.openai_upstream import split_events, usage_of


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
    assert parse_request(b'{"model": "m", "messages": [], "stream": true}', CHAT) == ("m", True)
    assert parse_request(b'{"model": "m", "messages": [], "stream": null}', CHAT) == ("m", False)
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
