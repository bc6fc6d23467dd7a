"""SQLite table of API keys: only the SHA-256 of each secret is stored.

A connection of its own to the controller's database file (WAL mode lets it
sit beside the main store's connection); sqlite3 blocks, so calls run in a
worker thread behind one lock.

Each key may name the key that created it (`parent_id`); the tree they form is
walked with recursive queries, so revoking a key or checking a key's ancestors
costs one statement whatever the depth.
"""

from __future__ import annotations

import json
from pathlib import Path

from controller.keys import KeyRecord, KeyRole
from controller.store.base import SqliteFile
from kscope_common.limits import Limits

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    models_json TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    revoked INTEGER NOT NULL,
    parent_id TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS api_keys_owner ON api_keys (owner);
CREATE TABLE IF NOT EXISTS owner_limits (
    owner TEXT PRIMARY KEY,
    requests_per_minute INTEGER NOT NULL,
    tokens_per_minute INTEGER NOT NULL,
    max_concurrent INTEGER NOT NULL,
    daily_tokens INTEGER NOT NULL
);
"""
# Databases made before keys had parents lack the column; the index on it can
# only be created once the column exists (see KeyStore._migrate).
_PARENT_COLUMN = "ALTER TABLE api_keys ADD COLUMN parent_id TEXT NOT NULL DEFAULT ''"
_PARENT_INDEX = "CREATE INDEX IF NOT EXISTS api_keys_parent ON api_keys (parent_id)"
_LIMIT_COLUMNS = (
    "requests_per_minute tokens_per_minute max_concurrent daily_tokens priority".split()
)
"""Added with per-key limits; older databases get them, 0 (no limit), at start."""

_COLUMNS = (
    "id key_hash prefix owner name role models_json created_at expires_at revoked parent_id "
    + " ".join(_LIMIT_COLUMNS)
).split()
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM api_keys"

# The key itself and every key below it. UNION (not UNION ALL) drops repeats,
# so even a corrupt table with a cycle cannot make the walk run forever.
_TREE = """
WITH RECURSIVE tree(id) AS (
    SELECT ?
    UNION
    SELECT api_keys.id FROM api_keys JOIN tree ON api_keys.parent_id = tree.id
)
"""
# The ids above the key (its parent, the parent's parent …), ending with ''.
_CHAIN = """
WITH RECURSIVE chain(id) AS (
    SELECT parent_id FROM api_keys WHERE id = ?
    UNION
    SELECT api_keys.parent_id FROM api_keys JOIN chain ON api_keys.id = chain.id
)
"""


def _limit_values(key: KeyRecord) -> tuple[int, ...]:
    limits = key.limits
    return (
        limits.requests_per_minute, limits.tokens_per_minute, limits.max_concurrent,
        limits.daily_tokens, key.priority,
    )  # fmt: skip


def _record(row: tuple[object, ...]) -> KeyRecord:
    values = dict(zip(_COLUMNS, row, strict=True))
    return KeyRecord(
        id=str(values["id"]),
        key_hash=str(values["key_hash"]),
        prefix=str(values["prefix"]),
        owner=str(values["owner"]),
        name=str(values["name"]),
        role=KeyRole(str(values["role"])),
        models=tuple(json.loads(str(values["models_json"]))),
        created_at=float(values["created_at"]),  # type: ignore[arg-type]
        expires_at=float(values["expires_at"]),  # type: ignore[arg-type]
        revoked=bool(values["revoked"]),
        parent_id=str(values["parent_id"]),
        limits=Limits(*(int(values[c]) for c in _LIMIT_COLUMNS[:4])),  # type: ignore[call-overload]
        priority=int(values["priority"]),  # type: ignore[call-overload]
    )


class KeyStore(SqliteFile):
    """API keys in the controller's SQLite file."""

    def __init__(self, path: Path):
        super().__init__(path, _SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Add what older databases lack; runs once at start, before any call."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(api_keys)")}
        if "parent_id" not in columns:
            # Keys made before this column existed have no parent: ''.
            self._db.execute(_PARENT_COLUMN)
        self._db.execute(_PARENT_INDEX)
        for column in _LIMIT_COLUMNS:
            if column not in columns:
                self._db.execute(
                    f"ALTER TABLE api_keys ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0"
                )

    async def insert(self, key: KeyRecord) -> None:
        row = (
            key.id, key.key_hash, key.prefix, key.owner, key.name, key.role.value,
            json.dumps(list(key.models)), key.created_at, key.expires_at, int(key.revoked),
            key.parent_id, *_limit_values(key),
        )  # fmt: skip
        places = ", ".join("?" * len(_COLUMNS))
        sql = f"INSERT INTO api_keys ({', '.join(_COLUMNS)}) VALUES ({places})"
        await self._run(lambda: self._db.execute(sql, row))

    async def by_hash(self, key_hash: str) -> KeyRecord | None:
        sql = f"{_SELECT} WHERE key_hash = ?"
        row = await self._run(lambda: self._db.execute(sql, (key_hash,)).fetchone())
        return None if row is None else _record(row)

    async def by_id(self, key_id: str) -> KeyRecord | None:
        sql = f"{_SELECT} WHERE id = ?"
        row = await self._run(lambda: self._db.execute(sql, (key_id,)).fetchone())
        return None if row is None else _record(row)

    async def ancestors(self, key_id: str) -> list[KeyRecord]:
        """The keys above `key_id` (the one that created it, that one's creator …).

        In no particular order; an ancestor missing from the table is simply
        absent, which the caller can tell from the parent ids.
        """
        sql = f"{_CHAIN} {_SELECT} WHERE id IN (SELECT id FROM chain)"
        rows = await self._run(lambda: self._db.execute(sql, (key_id,)).fetchall())
        return [_record(r) for r in rows]

    async def list_keys(self, owner: str | None) -> list[KeyRecord]:
        sql = _SELECT
        args: tuple[str, ...] = ()
        if owner is not None:
            sql += " WHERE owner = ?"
            args = (owner,)
        rows = await self._run(
            lambda: self._db.execute(sql + " ORDER BY created_at", args).fetchall()
        )
        return [_record(r) for r in rows]

    async def revoke_tree(self, key_id: str) -> list[KeyRecord]:
        """Revoke the key and every key below it; returns those not revoked before.

        One transaction, so a reader never sees a revoked key whose children
        are still live.
        """
        select = f"{_TREE} {_SELECT} WHERE revoked = 0 AND id IN (SELECT id FROM tree)"
        update = f"{_TREE} UPDATE api_keys SET revoked = 1 WHERE id IN (SELECT id FROM tree)"

        def revoke() -> list[tuple[object, ...]]:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = self._db.execute(select, (key_id,)).fetchall()
                self._db.execute(update, (key_id,))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return rows

        rows = await self._run(revoke)
        return [_record(r) for r in rows]

    async def update_limits(self, key: KeyRecord) -> None:
        """Store the key's limits and priority (nothing else of it changes)."""
        sql = f"UPDATE api_keys SET {', '.join(c + ' = ?' for c in _LIMIT_COLUMNS)} WHERE id = ?"
        await self._run(lambda: self._db.execute(sql, (*_limit_values(key), key.id)))

    async def owner_limits(self) -> dict[str, Limits]:
        sql = f"SELECT owner, {', '.join(_LIMIT_COLUMNS[:4])} FROM owner_limits"
        rows = await self._run(lambda: self._db.execute(sql).fetchall())
        return {str(r[0]): Limits(*(int(v) for v in r[1:])) for r in rows}

    async def set_owner_limits(self, owner: str, limits: Limits) -> None:
        values = (
            owner, limits.requests_per_minute, limits.tokens_per_minute, limits.max_concurrent,
            limits.daily_tokens,
        )  # fmt: skip
        sql = "INSERT OR REPLACE INTO owner_limits VALUES (?, ?, ?, ?, ?)"
        await self._run(lambda: self._db.execute(sql, values))

    async def has_admin(self) -> bool:
        sql = "SELECT 1 FROM api_keys WHERE role = ? AND revoked = 0 LIMIT 1"
        row = await self._run(lambda: self._db.execute(sql, (KeyRole.ADMIN.value,)).fetchone())
        return row is not None
