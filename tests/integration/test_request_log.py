"""Request identity and the access log, with real processes: every /v1
response carries X-Request-Id (the client's own, or one the facade made), and
with the access log on, each request is one JSON line naming that id, the
key's id and owner (never its secret), the status and the engine's tokens."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from kscope.v1 import keys_pb2, keys_pb2_grpc
from tests.procs import Controller, Facade, one_model_stack, wait_until


@dataclass
class Logged:
    controller: Controller
    facade: Facade
    log: Path
    key_id: str
    secret: str


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Logged]:
    tmp = tmp_path_factory.mktemp("request-log")
    log = tmp / "access.log"
    env = {"KSCOPE_REQUIRE_KEY": "1", "KSCOPE_ACCESS_LOG": "1", "KSCOPE_ACCESS_LOG_PATH": str(log)}
    with one_model_stack(tmp, facade_env=env) as stack:
        with stack.controller.channel() as channel:
            reply = keys_pb2_grpc.KeyServiceStub(channel).CreateKey(
                keys_pb2.CreateKeyRequest(owner="lena", name="log"), timeout=10
            )
        yield Logged(stack.controller, stack.facade, log, reply.key.id, reply.secret)


def post(logged: Logged, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(
        f"{logged.facade.base_url}/v1/chat/completions", json=body,
        headers={"Authorization": f"Bearer {logged.secret}", **headers}, timeout=30,
    )  # fmt: skip


def lines(logged: Logged) -> list[dict[str, Any]]:
    if not logged.log.exists():
        return []
    return [json.loads(line) for line in logged.log.read_text().splitlines() if line]


BODY = {"model": "one", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def test_the_clients_request_id_comes_back_and_is_logged(logged: Logged) -> None:
    reply = post(logged, BODY, **{"X-Request-Id": "trace-42.a"})
    assert reply.status_code == 200
    assert reply.headers["x-request-id"] == "trace-42.a"
    wait_until(lambda: any(x["request_id"] == "trace-42.a" for x in lines(logged)), 5,
               what="the access-log line")  # fmt: skip
    line = next(x for x in lines(logged) if x["request_id"] == "trace-42.a")
    assert line["path"] == "/v1/chat/completions" and line["method"] == "POST"
    assert (line["model"], line["status"], line["key_id"], line["owner"]) == (
        "one", 200, logged.key_id, "lena",
    )  # fmt: skip
    assert line["completion_tokens"] == 3 and line["prompt_tokens"] > 0
    assert line["duration_ms"] > 0


def test_without_an_id_the_facade_makes_one_for_every_answer(logged: Logged) -> None:
    stream = post(logged, {**BODY, "stream": True})
    assert stream.status_code == 200
    made = stream.headers["x-request-id"]
    assert made.startswith("req-") and len(made) > 10
    other = post(logged, BODY)
    assert other.headers["x-request-id"] != made
    # An id that is no short token of safe characters is replaced, not echoed.
    odd = post(logged, BODY, **{"X-Request-Id": "a b"})
    assert odd.headers["x-request-id"].startswith("req-")
    # Refusals and other /v1 answers carry one too.
    refused = httpx.post(f"{logged.facade.base_url}/v1/chat/completions", json=BODY,
                         headers={"Authorization": "Bearer ks-wrong"}, timeout=10)  # fmt: skip
    assert refused.status_code == 401 and refused.headers["x-request-id"].startswith("req-")
    auth = {"Authorization": f"Bearer {logged.secret}"}
    models = httpx.get(f"{logged.facade.base_url}/v1/models", headers=auth, timeout=10)
    assert models.status_code == 200 and "x-request-id" in models.headers
    ids = {made, other.headers["x-request-id"], refused.headers["x-request-id"]}
    wait_until(lambda: ids <= {x["request_id"] for x in lines(logged)}, 5, what="the lines")
    logged_lines = {x["request_id"]: x for x in lines(logged)}
    assert logged_lines[made]["ttft_ms"] is not None
    assert logged_lines[refused.headers["x-request-id"]]["status"] == 401


def test_no_secret_is_ever_logged(logged: Logged) -> None:
    post(logged, BODY)
    wait_until(lambda: len(lines(logged)) > 0, 5, what="a line")
    text = logged.log.read_text()
    assert logged.secret not in text and "ks-wrong" not in text
    facade_log = logged.facade.proc.log()
    assert logged.secret not in facade_log


def test_with_one_model_in_the_catalog_a_request_may_name_none(logged: Logged) -> None:
    body = {k: v for k, v in BODY.items() if k != "model"}
    reply = post(logged, body)
    assert reply.status_code == 200, reply.text
    wait_until(
        lambda: any(x["request_id"] == reply.headers["x-request-id"] and x["model"] == "one"
                    for x in lines(logged)),
        5, what="logged under the one model",
    )  # fmt: skip
