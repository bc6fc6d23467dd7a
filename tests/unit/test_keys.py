"""API keys without processes: the registry over a real SQLite file, the facade's
key check, local portal users."""

from __future__ import annotations

import hashlib
import hmac
import stat
import time
from pathlib import Path
from typing import Any

import pytest

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
from facade.portal.local_users import add_user, check_local_user, hash_password, verify_password

ADMIN = Caller(owner="ops", admin=True)


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
    assert events.get_nowait() == [key.key_hash]
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


async def test_facade_check_is_a_hash_lookup() -> None:
    checker = KeyChecker("127.0.0.1:1", static_key="static", required=True, cache_ttl_s=30)
    try:
        secret = "ks-" + "x" * 43
        key_hash = hashlib.sha256(secret.encode()).hexdigest()
        lookups: list[str] = []

        class SpyCache(dict[str, Any]):
            def get(self, key: str, default: Any = None) -> Any:
                lookups.append(key)
                return super().get(key, default)

        checker._cache = SpyCache()
        pending = checker.check(_scope(b"Bearer " + secret.encode()))
        assert isinstance(pending, PendingCheck) and pending.key_hash == key_hash
        assert lookups == [key_hash]
        # Once the controller answered, the check is a dict lookup (no await).
        grant = Grant("alice", expires_at=time.time() + 60)
        from facade.auth import _Cached

        checker._cache[key_hash] = _Cached(grant, time.monotonic())
        checker.watching = True
        assert checker.check(_scope(b"Bearer " + secret.encode())) is grant
        # A key that shares all but its last character is just another hash.
        near = secret[:-1] + "y"
        assert isinstance(checker.check(_scope(b"Bearer " + near.encode())), PendingCheck)
        assert all(secret not in str(k) for k in checker._cache)
        checker._cache[key_hash] = _Cached(
            Grant("alice", expires_at=time.time() - 1), time.monotonic()
        )
        assert checker.check(_scope(b"Bearer " + secret.encode())) is EXPIRED
        checker.revoked([key_hash])
        assert checker.check(_scope(b"Bearer " + secret.encode())) is INVALID
        assert checker.check(_scope(None)) is MISSING
        assert checker.check(_scope(b"Bearer static")) is STATIC
        assert checker.check(_scope(b"Bearer nope")) is INVALID
    finally:
        await checker.close()
    open_checker = KeyChecker("127.0.0.1:1", static_key=None, required=False, cache_ttl_s=30)
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
