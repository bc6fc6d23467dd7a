"""SQLite table of API keys: only the SHA-256 of each secret is stored.

A connection of its own to the controller's database file (WAL mode lets it
sit beside the main store's connection); sqlite3 blocks, so calls run in a
worker thread behind one lock.
"""

from __future__ import annotations

import json
from pathlib import Path

from controller.keys import KeyRecord, KeyRole
from controller.store.base import SqliteFile

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
    revoked INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS api_keys_owner ON api_keys (owner);
"""
_COLUMNS = "id key_hash prefix owner name role models_json created_at expires_at revoked".split()


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
    )


class KeyStore(SqliteFile):
    """API keys in the controller's SQLite file."""

    def __init__(self, path: Path):
        super().__init__(path, _SCHEMA)

    async def insert(self, key: KeyRecord) -> None:
        row = (
            key.id, key.key_hash, key.prefix, key.owner, key.name, key.role.value,
            json.dumps(list(key.models)), key.created_at, key.expires_at, int(key.revoked),
        )  # fmt: skip
        sql = f"INSERT INTO api_keys ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * 10)})"
        await self._run(lambda: self._db.execute(sql, row))

    async def by_hash(self, key_hash: str) -> KeyRecord | None:
        sql = f"SELECT {', '.join(_COLUMNS)} FROM api_keys WHERE key_hash = ?"
        row = await self._run(lambda: self._db.execute(sql, (key_hash,)).fetchone())
        return None if row is None else _record(row)

    async def by_id(self, key_id: str) -> KeyRecord | None:
        sql = f"SELECT {', '.join(_COLUMNS)} FROM api_keys WHERE id = ?"
        row = await self._run(lambda: self._db.execute(sql, (key_id,)).fetchone())
        return None if row is None else _record(row)

    async def list_keys(self, owner: str | None) -> list[KeyRecord]:
        sql = f"SELECT {', '.join(_COLUMNS)} FROM api_keys"
        args: tuple[str, ...] = ()
        if owner is not None:
            sql += " WHERE owner = ?"
            args = (owner,)
        rows = await self._run(
            lambda: self._db.execute(sql + " ORDER BY created_at", args).fetchall()
        )
        return [_record(r) for r in rows]

    async def revoke(self, key_id: str) -> None:
        sql = "UPDATE api_keys SET revoked = 1 WHERE id = ?"
        await self._run(lambda: self._db.execute(sql, (key_id,)))

    async def has_admin(self) -> bool:
        sql = "SELECT 1 FROM api_keys WHERE role = ? AND revoked = 0 LIMIT 1"
        row = await self._run(lambda: self._db.execute(sql, (KeyRole.ADMIN.value,)).fetchone())
        return row is not None
