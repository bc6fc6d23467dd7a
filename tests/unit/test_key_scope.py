"""A key makes only narrower keys, and the keys it makes die with it.

The registry over a real SQLite file: user keys may not grant a higher role,
more models or a longer life than their own; every key made by a key records
its parent, revoking a key revokes its descendants, and a key whose ancestor
is revoked, expired or gone is refused.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from controller.keys import (
    Caller,
    Forbidden,
    InvalidKeyRequest,
    KeyRecord,
    KeyRegistry,
    KeyRole,
    NotAuthenticated,
    hash_secret,
    require_models_within,
)
from controller.store.keys import KeyStore

OPERATOR = Caller(owner="operator", admin=True)
DAY = 86400.0


@pytest.fixture
def registry(tmp_path: Path) -> KeyRegistry:
    return KeyRegistry(KeyStore(tmp_path / "kscope.db"), DAY, 10 * DAY)


async def _user(
    registry: KeyRegistry, models: tuple[str, ...] = (), expires_in_s: float = 0
) -> tuple[KeyRecord, Caller]:
    """A user key for alice made by the operator, and the caller presenting it."""
    _, secret = await registry.create(
        OPERATOR, "alice", "parent", expires_in_s=expires_in_s, models=models
    )
    return await registry.authenticate(secret), await registry.caller(secret)


def _record(key_id: str, **fields: object) -> KeyRecord:
    """A key as the store keeps it, for states the registry will not produce."""
    now = time.time()
    values: dict[str, object] = {
        "id": key_id, "key_hash": hash_secret(key_id), "prefix": "ks-xxxxx", "owner": "alice",
        "name": key_id, "role": KeyRole.USER, "models": (), "created_at": now,
        "expires_at": now + DAY,
    }  # fmt: skip
    return KeyRecord(**{**values, **fields})  # type: ignore[arg-type]


# --- role and owner ---------------------------------------------------------------------------


async def test_a_user_key_cannot_make_an_admin_key_or_one_for_someone_else(
    registry: KeyRegistry,
) -> None:
    _, alice = await _user(registry)
    with pytest.raises(Forbidden, match="admin"):
        await registry.create(alice, "", "escalate", role=KeyRole.ADMIN)
    with pytest.raises(Forbidden, match="other owners"):
        await registry.create(alice, "bob", "for bob")
    key, _ = await registry.create(alice, "", "mine")
    assert (key.owner, key.role) == ("alice", KeyRole.USER)


def test_a_caller_is_an_admin_or_holds_a_key() -> None:
    with pytest.raises(ValueError, match="hold a key"):
        Caller(owner="alice", admin=False)
    admin_key = _record("key_a", role=KeyRole.ADMIN)
    with pytest.raises(ValueError, match="its key's"):
        Caller(owner="alice", admin=False, key=admin_key)
    with pytest.raises(ValueError, match="its key's"):
        Caller(owner="bob", admin=True, key=admin_key)
    assert Caller.holding(admin_key) == Caller("alice", True, admin_key)


# --- expiry -----------------------------------------------------------------------------------


async def test_a_user_key_cannot_outlive_its_parent(registry: KeyRegistry) -> None:
    parent, alice = await _user(registry, expires_in_s=3600)
    with pytest.raises(Forbidden, match="outlive"):
        await registry.create(alice, "", "longer", expires_in_s=7200)
    with pytest.raises(InvalidKeyRequest, match="at most"):
        await registry.create(alice, "", "ten years", expires_in_s=3650 * DAY)
    # The default lifetime (a day) is cut to end with the parent.
    clamped, _ = await registry.create(alice, "", "default")
    assert clamped.expires_at == parent.expires_at
    shorter, _ = await registry.create(alice, "", "shorter", expires_in_s=60)
    assert shorter.expires_at == pytest.approx(shorter.created_at + 60)


async def test_admin_keys_and_operators_are_not_limited(registry: KeyRegistry) -> None:
    _, admin_secret = await registry.create(
        OPERATOR, "ops", "admin", expires_in_s=3600, role=KeyRole.ADMIN, models=("tiny*",)
    )
    admin = await registry.caller(admin_secret)
    assert admin.admin and admin.key is not None and admin.key.parent_id == ""
    key, _ = await registry.create(
        admin, "bob", "wide", expires_in_s=5 * DAY, models=("*",), role=KeyRole.ADMIN
    )
    assert key.parent_id == "" and key.models == ("*",)
    loose, _ = await registry.create(OPERATOR, "carol", "no parent")
    assert loose.parent_id == ""


# --- models -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("asked", "allowed"),
    [
        (("*",), False),
        ((), False),
        (("tiny-a",), True),
        (("tiny*",), True),
        (("other",), False),
        (("tiny-?",), False),  # narrower maybe, but a pattern not the parent's
        (("tiny-a", "other"), False),
    ],
)
async def test_a_user_key_cannot_widen_its_models(
    registry: KeyRegistry, asked: tuple[str, ...], allowed: bool
) -> None:
    _, alice = await _user(registry, models=("tiny*",))
    if allowed:
        key, _ = await registry.create(alice, "", "child", models=asked)
        assert key.models == asked
    else:
        with pytest.raises(Forbidden, match="model"):
            await registry.create(alice, "", "child", models=asked)


def test_model_scope_rules() -> None:
    require_models_within((), ())  # a parent with every model may grant anything
    require_models_within((), ("*",))
    require_models_within(("a", "b*"), ("a", "b*", "b-1"))
    with pytest.raises(Forbidden, match="'c'"):
        require_models_within(("a", "b*"), ("a", "c"))
    with pytest.raises(Forbidden, match="limited to models a, b"):
        require_models_within(("a", "b*"), ())
    with pytest.raises(Forbidden, match=r"'\[ab\]'"):
        require_models_within(("a", "b"), ("[ab]",))


async def test_a_grandchild_cannot_regain_what_its_parent_gave_up(
    registry: KeyRegistry,
) -> None:
    _, alice = await _user(registry, models=("tiny*",))
    _, child_secret = await registry.create(alice, "", "child", models=("tiny-a",))
    child = await registry.caller(child_secret)
    with pytest.raises(Forbidden, match="tiny\\*"):
        await registry.create(child, "", "grandchild", models=("tiny*",))
    grandchild, _ = await registry.create(child, "", "grandchild", models=("tiny-a",))
    assert child.key is not None and grandchild.parent_id == child.key.id


# --- dying with the parent --------------------------------------------------------------------


async def test_revoking_a_key_revokes_the_keys_made_from_it(registry: KeyRegistry) -> None:
    parent, alice = await _user(registry)
    child, child_secret = await registry.create(alice, "", "child")
    grandchild, grandchild_secret = await registry.create(
        await registry.caller(child_secret), "", "grandchild"
    )
    second, second_secret = await registry.create(alice, "", "second")
    sibling, sibling_secret = await registry.create(OPERATOR, "alice", "unrelated")
    events = registry.watch()

    await registry.revoke(alice, child.id)  # a child first: its parent lives on
    assert set(events.get_nowait().revoked) == {child.key_hash, grandchild.key_hash}
    assert (await registry.authenticate(second_secret)).id == second.id

    assert (await registry.revoke(OPERATOR, parent.id)).revoked
    # Only keys revoked now are reported: the child and grandchild were already.
    assert set(events.get_nowait().revoked) == {parent.key_hash, second.key_hash}
    for secret in (child_secret, grandchild_secret, second_secret):
        with pytest.raises(NotAuthenticated):
            await registry.authenticate(secret)
    assert (await registry.authenticate(sibling_secret)).id == sibling.id
    await registry.revoke(OPERATOR, parent.id)  # again: nothing new to report
    assert events.empty()
    listed = await registry.list_keys(OPERATOR, "alice", include_revoked=True)
    assert {k.id for k in listed if k.revoked} == {parent.id, child.id, grandchild.id, second.id}


async def test_an_admin_keys_children_outlive_it(registry: KeyRegistry) -> None:
    # The portal makes every user's key with its admin service key: retiring
    # that key must not take every user's key with it.
    _, admin_secret = await registry.create(OPERATOR, "ops", "portal", role=KeyRole.ADMIN)
    admin = await registry.caller(admin_secret)
    assert admin.key is not None
    bob, bob_secret = await registry.create(admin, "bob", "bob's")
    events = registry.watch()
    await registry.revoke(OPERATOR, admin.key.id)
    assert set(events.get_nowait().revoked) == {admin.key.key_hash}
    assert (await registry.authenticate(bob_secret)).id == bob.id


async def test_a_key_whose_ancestor_expired_is_refused(
    registry: KeyRegistry, tmp_path: Path
) -> None:
    store = KeyStore(tmp_path / "kscope.db")
    now = time.time()
    await store.insert(_record("key_root", expires_at=now + DAY))
    await store.insert(_record("key_mid", parent_id="key_root", expires_at=now - 1))
    await store.insert(_record("key_leaf", parent_id="key_mid"))
    with pytest.raises(NotAuthenticated, match="has expired"):
        await registry.authenticate("key_leaf")  # _record hashes the id as the secret
    store.close()


async def test_a_key_whose_ancestor_is_revoked_or_gone_is_refused(
    registry: KeyRegistry, tmp_path: Path
) -> None:
    # Both can only arise from a race (a key made while its parent is being
    # revoked) or a hand-edited table; the check at authentication covers them.
    store = KeyStore(tmp_path / "kscope.db")
    await store.insert(_record("key_root", revoked=True))
    await store.insert(_record("key_leaf", parent_id="key_root"))
    await store.insert(_record("key_orphan", parent_id="key_nowhere"))
    with pytest.raises(NotAuthenticated, match="revoked"):
        await registry.authenticate("key_leaf")
    with pytest.raises(NotAuthenticated, match="no longer exists"):
        await registry.authenticate("key_orphan")
    store.close()


async def test_authentication_reports_the_expiry_of_the_chain(
    registry: KeyRegistry, tmp_path: Path
) -> None:
    # A stored child that outlives its parent (a hand-edited table) still ends
    # with it, and facades that cache the answer are told the earlier time.
    store = KeyStore(tmp_path / "kscope.db")
    now = time.time()
    await store.insert(_record("key_root", expires_at=now + 3600))
    await store.insert(_record("key_leaf", parent_id="key_root", expires_at=now + 5 * DAY))
    seen = await registry.authenticate("key_leaf")
    assert seen.expires_at == pytest.approx(now + 3600)
    store.close()


# --- the table --------------------------------------------------------------------------------

_OLD_SCHEMA = """
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY, key_hash TEXT NOT NULL UNIQUE, prefix TEXT NOT NULL,
    owner TEXT NOT NULL, name TEXT NOT NULL, role TEXT NOT NULL, models_json TEXT NOT NULL,
    created_at REAL NOT NULL, expires_at REAL NOT NULL, revoked INTEGER NOT NULL
);
"""


async def test_a_table_without_parents_gains_the_column(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.executescript(_OLD_SCHEMA)
        db.execute(
            "INSERT INTO api_keys VALUES (?, ?, 'ks-xxxxx', 'alice', 'old', 'user', '[\"m\"]',"
            " ?, ?, 0)",
            ("key_old", hash_secret("old-secret"), time.time(), time.time() + DAY),
        )
    db.close()
    registry = KeyRegistry(KeyStore(path), DAY, 10 * DAY)
    old = await registry.authenticate("old-secret")
    assert (old.id, old.parent_id, old.models) == ("key_old", "", ("m",))
    old_caller = await registry.caller("old-secret")
    child, child_secret = await registry.create(old_caller, "", "new", models=("m",))
    assert child.parent_id == "key_old"
    registry.close()
    registry = KeyRegistry(KeyStore(path), DAY, 10 * DAY)  # a second start migrates nothing
    assert (await registry.authenticate(child_secret)).parent_id == "key_old"
    await registry.revoke(OPERATOR, "key_old")
    with pytest.raises(NotAuthenticated):
        await registry.authenticate(child_secret)
    registry.close()
    with sqlite3.connect(path) as db:
        indexes = {row[1] for row in db.execute("PRAGMA index_list(api_keys)")}
    db.close()
    assert "api_keys_parent" in indexes
