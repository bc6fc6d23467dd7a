"""SQLite table of enrollment tokens: only the SHA-256 of each token is kept."""

from __future__ import annotations

from pathlib import Path

from controller.enrollment import EnrollmentKind, EnrollmentRecord
from controller.store.base import SqliteFile

_SCHEMA = """
CREATE TABLE IF NOT EXISTS enrollments (
    id TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    revoked INTEGER NOT NULL,
    uses INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS enrollments_name ON enrollments (kind, name);
"""
_COLUMNS = "id token_hash kind name created_at expires_at revoked uses".split()
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM enrollments"


def _record(row: tuple[object, ...]) -> EnrollmentRecord:
    values = dict(zip(_COLUMNS, row, strict=True))
    return EnrollmentRecord(
        id=str(values["id"]),
        token_hash=str(values["token_hash"]),
        kind=EnrollmentKind(str(values["kind"])),
        name=str(values["name"]),
        created_at=float(values["created_at"]),  # type: ignore[arg-type]
        expires_at=float(values["expires_at"]),  # type: ignore[arg-type]
        revoked=bool(values["revoked"]),
        uses=int(values["uses"]),  # type: ignore[call-overload]
    )


class EnrollmentStore(SqliteFile):
    """Enrollment tokens in the controller's SQLite file."""

    def __init__(self, path: Path):
        super().__init__(path, _SCHEMA)

    async def insert(self, record: EnrollmentRecord) -> None:
        row = (
            record.id, record.token_hash, record.kind.value, record.name, record.created_at,
            record.expires_at, int(record.revoked), record.uses,
        )  # fmt: skip
        sql = f"INSERT INTO enrollments ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * 8)})"
        await self._run(lambda: self._db.execute(sql, row))

    async def by_hash(self, token_hash: str) -> EnrollmentRecord | None:
        sql = f"{_SELECT} WHERE token_hash = ?"
        row = await self._run(lambda: self._db.execute(sql, (token_hash,)).fetchone())
        return None if row is None else _record(row)

    async def use(self, enrollment_id: str, one_time: bool) -> bool:
        """Count a use; a one-time token is used only if it never was (atomic)."""
        guard = " AND uses = 0" if one_time else ""
        sql = f"UPDATE enrollments SET uses = uses + 1 WHERE id = ? AND revoked = 0{guard}"
        cursor = await self._run(lambda: self._db.execute(sql, (enrollment_id,)))
        return cursor.rowcount == 1

    async def list_all(self, include_instances: bool = False) -> list[EnrollmentRecord]:
        sql = _SELECT if include_instances else f"{_SELECT} WHERE kind != 'instance'"
        rows = await self._run(lambda: self._db.execute(sql + " ORDER BY created_at").fetchall())
        return [_record(r) for r in rows]

    async def revoke(self, kind: EnrollmentKind, name: str) -> list[EnrollmentRecord]:
        """Revoke every enrollment of that kind and name; returns them."""
        sql = "UPDATE enrollments SET revoked = 1 WHERE kind = ? AND name = ?"
        await self._run(lambda: self._db.execute(sql, (kind.value, name)))
        rows = await self._run(
            lambda: self._db.execute(
                f"{_SELECT} WHERE kind = ? AND name = ?", (kind.value, name)
            ).fetchall()
        )
        return [_record(r) for r in rows]
