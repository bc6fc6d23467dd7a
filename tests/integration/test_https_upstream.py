"""An https upstream for the `openai` engine, with real processes and real TLS:
a self-signed CA signs bench/upstream.py's certificate, the catalog names the
CA in `upstream_ca_bundle`, and the official `openai` SDK streams through
facade → agent → upstream the chunks the upstream sends directly. With another
CA's file the model answers at once with a 503 that says the certificate did
not verify and which setting fixes it, and its agent logs that once."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from controller.catalog import CatalogError, EngineKind, ModelSpec, parse_catalog
from controller.launchers.base import LaunchSpec, agent_invocation
from kscope_common.pki import CertificateAuthority, agent_host, key_pem, make_ca, new_private_key
from node_agent.engines.base import Endpoint, EngineRequest, EngineUnavailable
from node_agent.engines.http1 import CertificateError, Http1Pool
from node_agent.engines.openai_upstream import OpenAIUpstream, split_events, tls_context
from node_agent.main import parse_settings
from tests.procs import (
    Controller,
    Facade,
    Upstream,
    start_controller,
    start_facade,
    start_upstream,
    stop_instances_left_behind,
    wait_until,
)

MAX_TOKENS = 12


@dataclass(frozen=True)
class Pki:
    ca: Path
    """The CA that signed the upstream's certificate."""
    other_ca: Path
    """A CA that signed nothing the upstream shows."""
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    tmp = tmp_path_factory.mktemp("https-pki")
    ca = CertificateAuthority.from_pem(*make_ca("upstream test CA"))
    key = new_private_key()
    cert = ca.issue(key.public_key(), agent_host("upstream"), 3600,
                    dns_names=["localhost"], ip_addresses=["127.0.0.1"])  # fmt: skip
    paths = Pki(tmp / "ca.pem", tmp / "other-ca.pem", tmp / "server.pem", tmp / "server.key")
    paths.ca.write_bytes(ca.cert_pem)
    paths.other_ca.write_bytes(make_ca("another CA")[0])
    paths.cert.write_bytes(cert)
    paths.key.write_bytes(key_pem(key))
    return paths


@pytest.fixture(scope="module")
def upstream(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    tmp = tmp_path_factory.mktemp("https-upstream")
    proc = start_upstream(tmp, "--ssl-certfile", str(pki.cert), "--ssl-keyfile", str(pki.key),
                          name="tls-upstream")  # fmt: skip
    try:
        yield proc
    finally:
        proc.proc.stop()


def https_url(upstream: Upstream) -> str:
    return f"https://127.0.0.1:{upstream.port}/v1"


# --- the agent's HTTP/1.1 client over TLS, against the real upstream ---------------------------


def _chat_request(host: str, path: str = "/v1/chat/completions") -> bytes:
    body = b'{"model":"bench","stream":true,"max_tokens":5,"messages":[]}'
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body  # fmt: skip


async def test_http1_client_streams_over_tls_and_keeps_the_connection(
    pki: Pki, upstream: Upstream
) -> None:
    for host in ("127.0.0.1", "localhost"):  # the certificate names both
        pool = Http1Pool(host, upstream.port, tls_context(str(pki.ca)))
        used = set()
        for _ in range(3):
            conn = await pool.acquire()
            used.add(id(conn))
            conn.send(_chat_request(host))
            await conn.headers(5)
            assert (conn.status, conn.content_type) == (200, b"text/event-stream")
            payloads, rest = split_events(await conn.read_all(5))
            assert rest == b"" and payloads[-1] == b"[DONE]"
            assert len(payloads) == 1 + 5 + 1 + 1  # role, tokens, finish, [DONE]
            pool.release(conn)
        assert len(used) == 1  # keep-alive: one TLS handshake for all three
        pool.close()


async def test_http1_client_refuses_a_certificate_it_cannot_verify(
    pki: Pki, upstream: Upstream
) -> None:
    for context in (tls_context(str(pki.other_ca)), tls_context()):  # system store: no
        with pytest.raises(CertificateError, match="could not be verified") as caught:
            await Http1Pool("127.0.0.1", upstream.port, context).acquire()
        assert caught.value.why  # OpenSSL's reason, e.g. "unable to get local issuer…"
    insecure = Http1Pool("127.0.0.1", upstream.port, tls_context(insecure_skip_verify=True))
    conn = await insecure.acquire()
    conn.send(_chat_request("127.0.0.1"))
    await conn.headers(5)
    assert conn.status == 200
    insecure.release(conn)
    insecure.close()


async def test_engine_health_uses_the_same_tls_settings(pki: Pki, upstream: Upstream) -> None:
    good = OpenAIUpstream(https_url(upstream), "bench", ca_bundle=str(pki.ca))
    wrong = OpenAIUpstream(https_url(upstream), "bench", ca_bundle=str(pki.other_ca))
    try:
        assert await good.healthy() and good.health_problem == ""
        assert not await wrong.healthy()
        assert "certificate verify failed" in wrong.health_problem
        assert "upstream_ca_bundle" in wrong.health_problem
        body = b'{"model":"bench","stream":true,"max_tokens":3,"messages":[]}'
        outputs = [o async for o in good.generate(EngineRequest(Endpoint.CHAT, body, stream=True))]
        assert sum(len(o.chunks) for o in outputs) == 1 + 3 + 1  # role, tokens, finish
        with pytest.raises(EngineUnavailable, match="certificate verify failed") as caught:
            _ = [o async for o in wrong.generate(EngineRequest(Endpoint.CHAT, body, stream=True))]
        assert caught.value.http_status == 503 and "upstream_ca_bundle" in caught.value.message
    finally:
        await good.stop()
        await wrong.stop()


# --- settings: the catalog entry, its validation, the agent's command line ----------------------


def _entry(**fields: Any) -> dict[str, Any]:
    return {"models": [{"name": "m", "engine": "openai", **fields}]}


def test_catalog_tls_settings_are_checked(pki: Pki) -> None:
    https = "https://up.example:8443/v1"
    not_pem = pki.ca.parent / "not-pem.txt"
    not_pem.write_text("not a certificate\n")
    bad: list[tuple[dict[str, Any], str]] = [
        ({"upstream_url": https, "upstream_ca_bundle": "/nonexistent/ca.pem"}, "cannot be used"),
        ({"upstream_url": https, "upstream_ca_bundle": str(not_pem)}, "cannot be used"),
        ({"upstream_url": https, "upstream_ca_bundle": "ca.pem"}, "absolute path"),
        ({"upstream_url": https, "upstream_ca_bundle": str(pki.ca),
          "upstream_insecure_skip_verify": True}, "exclude each other"),
        ({"upstream_url": "http://up:8000/v1", "upstream_ca_bundle": str(pki.ca)},
         "needs an https:// upstream_url"),
    ]  # fmt: skip
    for fields, message in bad:
        with pytest.raises(CatalogError, match=message):
            parse_catalog(_entry(**fields))
    good: list[dict[str, Any]] = [
        {"upstream_ca_bundle": str(pki.ca)}, {"upstream_insecure_skip_verify": True}
    ]  # fmt: skip
    for fields in good:
        assert parse_catalog(_entry(upstream_url=https, **fields)).models[0]


@pytest.mark.parametrize(
    "fields", [{"upstream_ca_bundle": "CA"}, {"upstream_insecure_skip_verify": True}, {}]
)
def test_tls_settings_reach_the_agent(pki: Pki, fields: dict[str, Any]) -> None:
    if fields.get("upstream_ca_bundle"):
        fields = {"upstream_ca_bundle": str(pki.ca)}
    model = ModelSpec(name="m", engine=EngineKind.OPENAI, upstream_url="https://u:1/v1", **fields)
    argv = agent_invocation(LaunchSpec("i-1", model, "ctl:1", "token"), sys.executable).argv
    settings = parse_settings(argv[3:])
    assert settings.upstream_url == "https://u:1/v1"
    assert settings.upstream_ca_bundle == fields.get("upstream_ca_bundle", "")
    assert settings.upstream_insecure_skip_verify == fields.get(
        "upstream_insecure_skip_verify", False
    )


# --- the whole stack ----------------------------------------------------------------------------


@dataclass
class Stack:
    controller: Controller
    facade: Facade
    upstream: Upstream


@pytest.fixture(scope="module")
def stack(
    pki: Pki, upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("https-stack")
    url = https_url(upstream)
    catalog = (
        f'[[models]]\nname = "secure"\nengine = "openai"\nupstream_url = "{url}"\n'
        f'upstream_model = "bench"\nupstream_ca_bundle = "{pki.ca}"\n'
        "min_replicas = 1\nexpected_startup_s = 3\n\n"
        f'[[models]]\nname = "wrong-ca"\nengine = "openai"\nupstream_url = "{url}"\n'
        f'upstream_ca_bundle = "{pki.other_ca}"\nmin_replicas = 1\nexpected_startup_s = 3\n'
    )
    controller = start_controller(tmp, catalog)
    facade: Facade | None = None
    try:
        facade = start_facade(tmp, controller)
        wait_until(lambda: _model(facade, "secure")["state"] == "ready", 60,
                   what="secure ready")  # fmt: skip
        yield Stack(controller, facade, upstream)
    finally:
        if facade is not None:
            facade.proc.stop()
        controller.proc.stop()
        stop_instances_left_behind(controller.state_dir)


def _model(facade: Facade, name: str) -> dict[str, Any]:
    models = httpx.get(f"{facade.base_url}/v1/models", timeout=5).json()["data"]
    found: dict[str, Any] = next(m for m in models if m["id"] == name)
    return found


def _stream(client: openai.OpenAI, model: str) -> list[Any]:
    chunks = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello over TLS"}],
        max_tokens=MAX_TOKENS, stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    return list(chunks)


def _shape(chunks: list[Any]) -> list[tuple[Any, ...]]:
    """What a chunk says, less its id and time (which differ per answer)."""
    shape = []
    for chunk in chunks:
        choice = chunk.choices[0] if chunk.choices else None
        shape.append((
            chunk.object, chunk.model,
            choice and (choice.delta.role, choice.delta.content, choice.finish_reason),
            chunk.usage and chunk.usage.completion_tokens,
        ))  # fmt: skip
    return shape


def test_sdk_streams_through_kscope_what_the_https_upstream_sends(stack: Stack, pki: Pki) -> None:
    direct = openai.OpenAI(
        base_url=https_url(stack.upstream), api_key="unused", max_retries=0,
        http_client=openai.DefaultHttpxClient(verify=tls_context(str(pki.ca))),
    )  # fmt: skip
    via = openai.OpenAI(base_url=f"{stack.facade.base_url}/v1", api_key="unused", max_retries=0)
    theirs = _stream(direct, "bench")
    ours = _stream(via, "secure")  # upstream_model: the upstream is asked for "bench"
    assert len(ours) == len(theirs) == 1 + MAX_TOKENS + 1 + 1  # role, tokens, finish, usage
    assert _shape(ours) == _shape(theirs)
    text = "".join(c.choices[0].delta.content or "" for c in ours if c.choices)
    assert text == " tok" * MAX_TOKENS
    echo = ours[0].model_extra["kscope_echo"]  # what reached the upstream, over TLS
    assert (echo["model"], echo["max_tokens"], echo["n_messages"]) == ("bench", MAX_TOKENS, 1)
    direct.close()
    via.close()


def test_a_wrong_ca_answers_at_once_with_a_clear_error(stack: Stack) -> None:
    wait_until(
        lambda: "certificate verify failed" in _model(stack.facade, "wrong-ca")["state_message"],
        30, what="the agent's certificate problem reaches the route table",
    )  # fmt: skip
    client = openai.OpenAI(
        base_url=f"{stack.facade.base_url}/v1", api_key="unused", max_retries=0, timeout=30
    )
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        _stream(client, "wrong-ca")
    assert time.monotonic() - started < 10  # answered, not held
    error = caught.value
    assert error.status_code == 503
    message = str(error.message)
    assert "certificate verify failed" in message and "upstream_ca_bundle" in message
    assert isinstance(error.body, dict) and error.body["code"] == "model_not_ready"
    client.close()
    # The agent said it once, however many health checks failed since.
    (instance,) = stack.controller.list_instances("wrong-ca")
    log = stack.controller.state_dir / "logs" / f"{instance.id}.log"
    time.sleep(1.5)  # a few more failed health checks (every 0.5 s while starting)
    said = [line for line in log.read_text().splitlines()
            if " ERROR " in line and "upstream certificate verify failed" in line]  # fmt: skip
    assert len(said) == 1, said
