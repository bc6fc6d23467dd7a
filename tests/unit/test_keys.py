"""API keys without processes: the registry over a real SQLite file, the facade's
key check, local portal users."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from controller.keys import (
    Caller,
    Forbidden,
    KeyRegistry,
    KeyRole,
    NotAuthenticated,
    hash_secret,
    model_allowed,
)
from controller.store.keys import KeyStore
from facade.auth import EXPIRED, INVALID, MISSING, OPEN, STATIC, Grant, KeyChecker, PendingCheck
from facade.errors import ApiError
from facade.portal.local_users import add_user, check_local_user, hash_password, verify_password
from kscope.v1 import keys_pb2, keys_pb2_grpc
from kscope_common.tls import PlaintextController

ADMIN = Caller(owner="ops", admin=True)
Context = grpc.aio.ServicerContext[object, object]


@pytest.fixture
def registry(tmp_path: Path) -> KeyRegistry:
    return KeyRegistry(KeyStore(tmp_path / "kscope.db"), 86400.0, 10 * 86400.0)


async def test_create_authenticate_revoke(registry: KeyRegistry, tmp_path: Path) -> None:
    key, secret = await registry.create(ADMIN, "alice", "laptop", models=("qwen-*",))
    assert secret.startswith("ks-") and len(secret) > 40
    assert key.key_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert (await registry.authenticate(secret)).id == key.id
    events = registry.watch()
    await registry.revoke(ADMIN, key.id)
    assert events.get_nowait().revoked == [key.key_hash]
    with pytest.raises(NotAuthenticated):
        await registry.authenticate(secret)
    assert secret.encode() not in b"".join(p.read_bytes() for p in tmp_path.glob("kscope.db*"))


async def test_expiry_default_and_limits(registry: KeyRegistry) -> None:
    key, _ = await registry.create(ADMIN, "alice", "default")
    assert key.expires_at - key.created_at == pytest.approx(86400.0)
    with pytest.raises(Exception, match="at most"):
        await registry.create(ADMIN, "alice", "too long", expires_in_s=11 * 86400)
    _, secret = await registry.create(ADMIN, "alice", "short", expires_in_s=0.05)
    time.sleep(0.1)
    with pytest.raises(NotAuthenticated, match="expired"):
        await registry.authenticate(secret)


async def test_roles(registry: KeyRegistry) -> None:
    key, user_secret = await registry.create(ADMIN, "bob", "b")
    bob = await registry.caller(user_secret)
    assert (bob.owner, bob.admin, bob.key) == ("bob", False, key)
    with pytest.raises(NotAuthenticated):  # no token stands in for an admin key
        await registry.caller("registration-token")
    with pytest.raises(Forbidden):
        await registry.create(bob, "alice", "x")
    with pytest.raises(Forbidden):
        await registry.create(bob, "", "x", role=KeyRole.ADMIN)
    with pytest.raises(NotAuthenticated):
        await registry.caller("")
    assert {k.owner for k in await registry.list_keys(bob)} == {"bob"}


async def test_authenticate_looks_up_the_hash_and_compares_in_constant_time(
    registry: KeyRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The timing of a check must not depend on how much of a guess matches: the
    store is searched by SHA-256 of the secret, and hashes are compared with
    hmac.compare_digest (never the secret, never `==`)."""
    _, secret = await registry.create(ADMIN, "alice", "k")
    looked_up: list[str] = []
    compared: list[tuple[Any, Any]] = []
    store = registry._store
    real_by_hash, real_compare = store.by_hash, hmac.compare_digest

    async def spy_by_hash(key_hash: str) -> Any:
        looked_up.append(key_hash)
        return await real_by_hash(key_hash)

    def spy_compare(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real_compare(a, b)

    monkeypatch.setattr(store, "by_hash", spy_by_hash)
    monkeypatch.setattr("controller.keys.hmac.compare_digest", spy_compare)
    await registry.authenticate(secret)
    assert looked_up == [hash_secret(secret)]
    assert compared == [(hash_secret(secret), hash_secret(secret))]
    near_miss = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    with pytest.raises(NotAuthenticated):
        await registry.authenticate(near_miss)
    assert looked_up[-1] == hash_secret(near_miss)


async def test_bootstrap_admin_key(registry: KeyRegistry, tmp_path: Path) -> None:
    path = tmp_path / "admin-key"
    secret = await registry.bootstrap_admin(path)
    assert secret is not None and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert (await registry.caller(secret)).admin
    assert await registry.bootstrap_admin(path) == secret  # kept across restarts
    path.unlink()
    assert await registry.bootstrap_admin(path) is None  # an admin exists already


def test_model_patterns() -> None:
    assert model_allowed((), "anything")
    assert model_allowed(("qwen-*", "llama"), "qwen-7b")
    assert not model_allowed(("qwen-*", "llama"), "llama-2")
    assert Grant("a", ("alpha",)).allows("alpha") and not Grant("a", ("alpha",)).allows("beta")


def _scope(auth: bytes | None) -> dict[str, Any]:
    return {"headers": [] if auth is None else [(b"authorization", auth)]}


class FakeKeyService(keys_pb2_grpc.KeyServiceServicer):
    """A fake controller KeyService (the facade's seam): it knows the keys it is
    given by secret and records every AuthenticateKey call it answers."""

    def __init__(self) -> None:
        self.keys: dict[str, keys_pb2.ApiKey] = {}
        self.calls: list[str] = []
        """The hash of each secret asked about, in order."""

    def add(self, secret: str, owner: str, expires_in_s: float = 3600.0) -> None:
        expires_at = Timestamp()
        expires_at.FromNanoseconds(int((time.time() + expires_in_s) * 1e9))
        self.keys[secret] = keys_pb2.ApiKey(owner=owner, expires_at=expires_at)

    async def AuthenticateKey(
        self, request: keys_pb2.AuthenticateKeyRequest, context: Context
    ) -> keys_pb2.AuthenticateKeyResponse:
        key_hash = hash_secret(request.secret)
        self.calls.append(key_hash)
        key = self.keys.get(request.secret)
        if key is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown API key")
        elif key.expires_at.ToNanoseconds() / 1e9 <= time.time():
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "the API key has expired")
        return keys_pb2.AuthenticateKeyResponse(key=key, key_hash=key_hash)

    # The rest of the service is not the facade's key check: refused.
    async def CreateKey(
        self, request: keys_pb2.CreateKeyRequest, context: Context
    ) -> keys_pb2.CreateKeyResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "fake")
        raise AssertionError("unreachable")

    async def ListKeys(
        self, request: keys_pb2.ListKeysRequest, context: Context
    ) -> keys_pb2.ListKeysResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "fake")
        raise AssertionError("unreachable")

    async def RevokeKey(
        self, request: keys_pb2.RevokeKeyRequest, context: Context
    ) -> keys_pb2.RevokeKeyResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "fake")
        raise AssertionError("unreachable")

    async def WatchKeyEvents(
        self, request: keys_pb2.WatchKeyEventsRequest, context: Context
    ) -> AsyncIterator[keys_pb2.WatchKeyEventsResponse]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "fake")
        yield keys_pb2.WatchKeyEventsResponse()

    async def UpdateKey(
        self, request: keys_pb2.UpdateKeyRequest, context: Context
    ) -> keys_pb2.UpdateKeyResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "fake")
        raise AssertionError("unreachable")

    async def SetOwnerLimits(
        self, request: keys_pb2.SetOwnerLimitsRequest, context: Context
    ) -> keys_pb2.SetOwnerLimitsResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "fake")
        raise AssertionError("unreachable")

    async def ListOwnerLimits(
        self, request: keys_pb2.ListOwnerLimitsRequest, context: Context
    ) -> keys_pb2.ListOwnerLimitsResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "fake")
        raise AssertionError("unreachable")


@pytest.fixture
async def key_service() -> AsyncIterator[tuple[FakeKeyService, PlaintextController]]:
    """A real gRPC server on 127.0.0.1 port 0 serving FakeKeyService, and the
    plaintext controller connection a KeyChecker talks to it through."""
    service = FakeKeyService()
    server = grpc.aio.server()
    keys_pb2_grpc.add_KeyServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    controller = PlaintextController(f"127.0.0.1:{port}")
    try:
        yield service, controller
    finally:
        await controller.close()
        await server.stop(None)


def _secret(tail: str) -> str:
    return "ks-" + tail * 43


async def _resolve(checker: KeyChecker, secret: str) -> Grant | ApiError:
    """What the facade does for a request: check, and ask the controller if pending."""
    checked = checker.check(_scope(b"Bearer " + secret.encode()))
    return await checker.fetch(checked) if isinstance(checked, PendingCheck) else checked


async def test_facade_key_cache_asks_the_controller_once_per_key(
    key_service: tuple[FakeKeyService, PlaintextController],
) -> None:
    service, controller = key_service
    alice, near = _secret("a"), _secret("a")[:-1] + "b"
    service.add(alice, "alice")
    checker = KeyChecker(controller, static_key="static", required=True, cache_ttl_s=30)
    try:
        # First sight: the cache cannot answer; the controller is asked, by hash.
        pending = checker.check(_scope(b"Bearer " + alice.encode()))
        assert isinstance(pending, PendingCheck) and pending.key_hash == hash_secret(alice)
        grant = await checker.fetch(pending)
        assert isinstance(grant, Grant) and grant.owner == "alice"
        assert service.calls == [hash_secret(alice)]
        # The same key again: answered from the cache, no call, no await.
        again = checker.check(_scope(b"Bearer " + alice.encode()))
        assert isinstance(again, Grant) and again.owner == "alice"
        assert service.calls == [hash_secret(alice)]
        # A key that shares all but its last character is another hash: asked about.
        assert await _resolve(checker, near) is INVALID
        assert service.calls == [hash_secret(alice), hash_secret(near)]
        assert await _resolve(checker, near) is INVALID  # refused from the cache
        assert len(service.calls) == 2
        # Concurrent requests with one new key share one call.
        bob = _secret("c")
        service.add(bob, "bob")
        both = await asyncio.gather(_resolve(checker, bob), _resolve(checker, bob))
        assert [g.owner for g in both if isinstance(g, Grant)] == ["bob", "bob"]
        assert service.calls.count(hash_secret(bob)) == 1
        # A revocation pushed by the controller is refused at once, without a call.
        calls = len(service.calls)
        checker.revoked([hash_secret(alice)])
        assert checker.check(_scope(b"Bearer " + alice.encode())) is INVALID
        carol = _secret("d")
        service.add(carol, "carol")
        checker.revoked([hash_secret(carol)])  # revoked before this facade saw it
        assert checker.check(_scope(b"Bearer " + carol.encode())) is INVALID
        assert len(service.calls) == calls
        # What the controller says about an expired key reaches the client.
        dave = _secret("e")
        service.add(dave, "dave", expires_in_s=-1)
        assert await _resolve(checker, dave) is EXPIRED
        # Decided without the controller: no key, the static key, not a KScope key.
        calls = len(service.calls)
        assert checker.check(_scope(None)) is MISSING
        assert checker.check(_scope(b"Bearer static")) is STATIC
        assert checker.check(_scope(b"Bearer nope")) is INVALID
        assert len(service.calls) == calls
    finally:
        await checker.close()
    open_checker = KeyChecker(controller, static_key=None, required=False, cache_ttl_s=30)
    assert open_checker.check(_scope(None)) is OPEN
    await open_checker.close()


def test_local_users(tmp_path: Path) -> None:
    stored = hash_password("s3cret-pw")
    assert stored.startswith("scrypt$") and "s3cret-pw" not in stored
    assert verify_password("s3cret-pw", stored) and not verify_password("other", stored)
    assert hash_password("s3cret-pw") != stored  # salted
    users = tmp_path / "users.toml"
    add_user(users, "erin", "s3cret-pw")
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    assert check_local_user(users, "erin", "s3cret-pw")
    assert not check_local_user(users, "erin", "wrong")
    assert not check_local_user(users, "nobody", "s3cret-pw")
    with pytest.raises(Exception, match="username"):
        add_user(users, 'bad"name', "pw")
