"""API keys end to end with real processes: controller (KeyService), a facade that
requires keys, agents (the `openai` engine) in front of bench/upstream.py, the
official `openai` SDK and the `kscope` CLI."""

from __future__ import annotations

import json
import re
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from kscope.v1 import keys_pb2, keys_pb2_grpc
from tests.procs import (
    ROOT,
    Controller,
    Facade,
    start_controller,
    start_facade,
    start_upstream,
    stop_instances_left_behind,
    wait_until,
)

STATIC_KEY = "static-test-key"
LOCAL_PASSWORD = "erin-password-9"
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


@dataclass
class KeySystem:
    tmp: Path
    controller: Controller
    facade: Facade
    admin_key: str

    def stub(self, channel: grpc.Channel) -> keys_pb2_grpc.KeyServiceStub:
        return keys_pb2_grpc.KeyServiceStub(channel)

    def rpc(self, method: str, request: object, key: str | None = None) -> object:
        credential = self.admin_key if key is None else key
        metadata = (("authorization", f"Bearer {credential}"),) if credential else ()
        with self.controller.channel(as_admin=False) as channel:
            return getattr(self.stub(channel), method)(request, metadata=metadata, timeout=5)

    def create(self, **fields: object) -> keys_pb2.CreateKeyResponse:
        fields.setdefault("owner", "alice")
        fields.setdefault("name", "test")
        reply = self.rpc("CreateKey", keys_pb2.CreateKeyRequest(**fields))  # type: ignore[arg-type]
        assert isinstance(reply, keys_pb2.CreateKeyResponse)
        return reply

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.facade.base_url}/v1", api_key=key, max_retries=0, timeout=10
        )


@pytest.fixture(scope="module")
def keys_system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeySystem]:
    tmp = tmp_path_factory.mktemp("keys")
    upstream = start_upstream(tmp)
    catalog = "".join(
        f"""
[[models]]
name = "{name}"
engine = "openai"
upstream_url = "{upstream.url}"
min_replicas = 1
expected_startup_s = 3
"""
        for name in ("alpha", "beta")
    )
    controller = start_controller(tmp, catalog)
    admin_key = (controller.state_dir / "admin-key").read_text().strip()
    users = tmp / "users.toml"
    subprocess.run(
        [str(ROOT / ".venv" / "bin" / "kscope"), "users", "add", "erin", "--file", str(users),
         "--password-stdin"],
        input=f"{LOCAL_PASSWORD}\n", text=True, check=True, timeout=30, capture_output=True,
    )  # fmt: skip
    facade = start_facade(
        tmp, controller, api_key=STATIC_KEY,
        env={"KSCOPE_PORTAL_SERVICE_KEY": admin_key, "KSCOPE_PORTAL_USERS_FILE": str(users)},
    )  # fmt: skip
    system = KeySystem(tmp, controller, facade, admin_key)
    try:

        def ready() -> bool:
            reply = httpx.get(
                f"{facade.base_url}/v1/models",
                headers={"Authorization": f"Bearer {admin_key}"},
                timeout=5,
            )
            return reply.status_code == 200 and all(
                m["state"] == "ready" for m in reply.json()["data"]
            )

        wait_until(ready, 30, what="alpha and beta ready")
        yield system
    finally:
        facade.proc.stop()
        controller.proc.stop()
        stop_instances_left_behind(controller.state_dir)
        upstream.proc.stop()


def test_bootstrap_admin_key_is_private(keys_system: KeySystem) -> None:
    path = keys_system.controller.state_dir / "admin-key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert keys_system.admin_key.startswith("ks-")


def test_created_key_works_and_revocation_reaches_the_facade_within_a_second(
    keys_system: KeySystem,
) -> None:
    created = keys_system.create(name="revoke-me")
    assert created.secret.startswith("ks-") and created.key.prefix == created.secret[:8]
    client = keys_system.client(created.secret)
    reply = client.chat.completions.create(model="alpha", messages=HI)
    assert reply.choices[0].message.content
    keys_system.rpc("RevokeKey", keys_pb2.RevokeKeyRequest(key_id=created.key.id))
    revoked_at = time.monotonic()
    while True:
        try:
            client.chat.completions.create(model="alpha", messages=HI)
        except openai.AuthenticationError:
            break
        assert time.monotonic() - revoked_at < 1.0, "a revoked key still works after 1 s"
        time.sleep(0.02)
    assert time.monotonic() - revoked_at < 1.0


def test_expired_key_is_401(keys_system: KeySystem) -> None:
    created = keys_system.create(name="short", expires_in_seconds=1)
    client = keys_system.client(created.secret)
    client.chat.completions.create(model="alpha", messages=HI)
    time.sleep(max(0.0, created.key.expires_at.ToNanoseconds() / 1e9 - time.time()) + 0.1)
    with pytest.raises(openai.AuthenticationError) as info:
        client.chat.completions.create(model="alpha", messages=HI)
    assert info.value.status_code == 401
    expired = {"code": "expired_api_key", "message": "The API key has expired.",
               "type": "authentication_error", "param": None}  # fmt: skip
    assert info.value.body == expired
    # A facade that never saw the key has nothing cached: it learns "expired"
    # from the controller's answer, not from a grant it kept.
    fresh = start_facade(keys_system.tmp, keys_system.controller, api_key=STATIC_KEY,
                         name="facade-never-saw-it")  # fmt: skip
    try:
        reply = httpx.post(
            f"{fresh.base_url}/v1/chat/completions", timeout=5,
            json={"model": "alpha", "messages": HI},
            headers={"Authorization": f"Bearer {created.secret}"},
        )  # fmt: skip
    finally:
        fresh.proc.stop()
    assert reply.status_code == 401
    assert reply.json()["error"] == expired


def test_key_limited_to_one_model_gets_403_for_another(keys_system: KeySystem) -> None:
    created = keys_system.create(name="alpha-only", models=["alph*"])
    client = keys_system.client(created.secret)
    client.chat.completions.create(model="alpha", messages=HI)
    with pytest.raises(openai.PermissionDeniedError) as info:
        client.chat.completions.create(model="beta", messages=HI)
    error = info.value.body
    assert isinstance(error, dict)
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "model_not_allowed" and error["param"] == "model"


def test_unknown_missing_and_malformed_keys_are_401_and_never_echoed(
    keys_system: KeySystem,
) -> None:
    url = f"{keys_system.facade.base_url}/v1/chat/completions"
    body = {"model": "alpha", "messages": HI}
    guess = "ks-" + "A" * 43
    for headers in ({}, {"Authorization": f"Bearer {guess}"}, {"Authorization": "Basic x"},
                    {"Authorization": "Bearer not-a-kscope-key"}):  # fmt: skip
        reply = httpx.post(url, json=body, headers=headers, timeout=5)
        assert reply.status_code == 401, headers
        assert reply.json()["error"]["type"] == "authentication_error"
        assert guess not in reply.text and "not-a-kscope-key" not in reply.text
    assert guess not in keys_system.facade.proc.log()
    assert guess not in keys_system.controller.proc.log()


def test_static_api_key_is_still_accepted(keys_system: KeySystem) -> None:
    reply = keys_system.client(STATIC_KEY).chat.completions.create(model="beta", messages=HI)
    assert reply.choices


def test_database_holds_only_hashes(keys_system: KeySystem) -> None:
    created = keys_system.create(name="grep-me")
    keys_system.client(created.secret).models.list()
    state = keys_system.controller.state_dir
    blobs = b"".join(p.read_bytes() for p in state.glob("kscope.db*"))
    assert created.secret.encode() not in blobs
    assert created.secret[3:].encode() not in blobs  # not even without the prefix
    listed = keys_system.rpc("ListKeys", keys_pb2.ListKeysRequest(owner="alice"))
    assert isinstance(listed, keys_pb2.ListKeysResponse)
    assert created.secret not in str(listed)


def test_key_management_permissions(keys_system: KeySystem) -> None:
    user = keys_system.create(owner="bob", name="bob's").secret
    # A user manages only their own keys and never makes admins.
    own = keys_system.rpc("CreateKey", keys_pb2.CreateKeyRequest(name="mine"), key=user)
    assert isinstance(own, keys_pb2.CreateKeyResponse) and own.key.owner == "bob"
    for request in (
        keys_pb2.CreateKeyRequest(owner="alice", name="x"),
        keys_pb2.CreateKeyRequest(name="x", role=keys_pb2.KEY_ROLE_ADMIN),
    ):
        with pytest.raises(grpc.RpcError) as info:
            keys_system.rpc("CreateKey", request, key=user)
        assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
    listed = keys_system.rpc("ListKeys", keys_pb2.ListKeysRequest(), key=user)
    assert isinstance(listed, keys_pb2.ListKeysResponse)
    assert {k.owner for k in listed.keys} == {"bob"}
    alices = keys_system.create(owner="alice", name="not bob's")
    with pytest.raises(grpc.RpcError) as info:
        keys_system.rpc("RevokeKey", keys_pb2.RevokeKeyRequest(key_id=alices.key.id), key=user)
    assert info.value.code() is grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        keys_system.rpc("ListKeys", keys_pb2.ListKeysRequest(), key="")
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    # An admin key makes admin keys; a user key cannot.
    admin = keys_system.rpc(
        "CreateKey",
        keys_pb2.CreateKeyRequest(owner="ops", name="ops", role=keys_pb2.KEY_ROLE_ADMIN),
    )
    assert isinstance(admin, keys_pb2.CreateKeyResponse)
    assert admin.key.role == keys_pb2.KEY_ROLE_ADMIN
    with pytest.raises(grpc.RpcError) as info:
        keys_system.rpc(
            "CreateKey",
            keys_pb2.CreateKeyRequest(owner="bob", name="up", role=keys_pb2.KEY_ROLE_ADMIN),
            key=user,
        )
    assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED


def _kscope(keys_system: KeySystem, *args: str) -> str:
    env_cmd = [str(ROOT / ".venv" / "bin" / "kscope"), *args]
    done = subprocess.run(
        env_cmd, capture_output=True, text=True, timeout=30, check=True,
        env={"KSCOPE_CONTROLLER": keys_system.controller.address,
             "KSCOPE_TLS_CA": str(keys_system.controller.ca_path),
             "KSCOPE_API_KEY": keys_system.admin_key, "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    return done.stdout


def test_cli_keys_models_instances_agents(keys_system: KeySystem) -> None:
    created = json.loads(
        _kscope(keys_system, "keys", "create", "--name", "cli", "--owner", "dora",
                "--model", "beta", "--days", "3", "--json")
    )  # fmt: skip
    assert created["secret"].startswith("ks-") and created["key"]["owner"] == "dora"
    keys_system.client(created["secret"]).chat.completions.create(model="beta", messages=HI)
    listing = json.loads(_kscope(keys_system, "keys", "list", "--owner", "dora", "--json"))
    assert [k["name"] for k in listing] == ["cli"]
    assert "secret" not in json.dumps(listing) and created["secret"] not in json.dumps(listing)
    table = _kscope(keys_system, "keys", "list", "--owner", "dora")
    assert "cli" in table and created["key"]["prefix"] in table
    _kscope(keys_system, "keys", "revoke", created["key"]["id"])
    assert json.loads(_kscope(keys_system, "keys", "list", "--owner", "dora", "--json")) == []
    models = json.loads(_kscope(keys_system, "models", "--json"))
    assert {m["name"] for m in models} == {"alpha", "beta"}
    assert "ready" in _kscope(keys_system, "models")
    assert "alpha" in _kscope(keys_system, "instances")
    agents = json.loads(_kscope(keys_system, "agents", "--json"))
    assert len(agents) == 2


def _csrf(page: httpx.Response) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert match, page.text
    return match.group(1)


def test_portal_local_login_csrf_and_cookie_flags(keys_system: KeySystem) -> None:
    base = f"{keys_system.facade.base_url}/portal"
    with httpx.Client(base_url=base, timeout=5) as http:
        page = http.get("/login")
        assert page.status_code == 200
        cookie = page.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=lax" in cookie and "path=/portal" in cookie
        assert "secure" not in cookie  # plain http here; Secure behind TLS
        login = {"username": "erin", "password": LOCAL_PASSWORD}
        assert http.post("/login", data=login).status_code == 403  # no token
        assert http.post("/login", data={**login, "csrf_token": "x"}).status_code == 403
        bad = http.post("/login", data={**login, "password": "nope", "csrf_token": _csrf(page)})
        assert bad.status_code == 401 and "Invalid username or password." in bad.text
        done = http.post("/login", data={**login, "csrf_token": _csrf(page)})
        assert done.status_code == 303 and done.headers["location"] == "/portal/keys"
        keys_page = http.get("/keys")
        assert keys_page.status_code == 200 and "erin" in keys_page.text
        token = _csrf(keys_page)
        # Every form needs the session's token: creating, revoking, logging out.
        assert http.post("/keys", data={"name": "n", "days": "3"}).status_code == 403
        assert http.post("/logout", data={}).status_code == 403
        created = http.post("/keys", data={"name": "n", "days": "3", "csrf_token": token})
        assert created.status_code == 200
        secret = re.search(r'id="new-key" readonly value="(ks-[^"]+)"', created.text)
        assert secret is not None
        assert keys_system.client(secret.group(1)).models.list().data
        again = http.get("/keys")
        assert secret.group(1) not in again.text  # shown once
        assert http.post("/logout", data={"csrf_token": token}).status_code == 303
        assert http.get("/keys").status_code == 303
