"""SQLite table of usage totals per hour, key, model, endpoint and status.

Facades report in batches; each batch is one transaction of upserts, so the
table grows with hours, keys, models, never with requests. Days are sums of
hours. Nothing about a request's content is stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from controller.store.base import SqliteFile

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage_hourly (
    hour INTEGER NOT NULL,
    key_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    model TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    status INTEGER NOT NULL,
    requests INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    duration_s REAL NOT NULL,
    PRIMARY KEY (hour, key_id, owner, model, endpoint, status)
);
CREATE INDEX IF NOT EXISTS usage_hourly_owner ON usage_hourly (owner, hour);
"""

_UPSERT = """
INSERT INTO usage_hourly VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (hour, key_id, owner, model, endpoint, status) DO UPDATE SET
    requests = requests + excluded.requests,
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens,
    duration_s = duration_s + excluded.duration_s
"""

GROUP_COLUMNS = {
    "owner": ("owner", "''"),
    "key": ("key_id", "owner"),
    "model": ("model", "''"),
    "day": ("strftime('%Y-%m-%d', hour, 'unixepoch')", "''"),
    "day_model": ("strftime('%Y-%m-%d', hour, 'unixepoch')", "model"),
}
"""What QueryUsage totals are per: (the group's SQL, a second column's SQL)."""


@dataclass(frozen=True)
class UsageEntry:
    """Requests of one kind in one hour (an addition to the table, or a total)."""

    hour: int
    key_id: str
    owner: str
    model: str
    endpoint: str
    status: int
    requests: int
    prompt_tokens: int
    completion_tokens: int
    duration_s: float

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class UsageTotal:
    group: str
    second: str
    """The model with `day_model`, the owner with `key`; '' otherwise."""
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    duration_s: float


@dataclass(frozen=True)
class UsageFilter:
    since_hour: int
    owner: str = ""
    key_id: str = ""
    model: str = ""


class UsageStore(SqliteFile):
    def __init__(self, path: Path):
        super().__init__(path, _SCHEMA)

    async def add(self, entries: Sequence[UsageEntry]) -> None:
        """Add a batch in one transaction."""
        rows = [
            (e.hour, e.key_id, e.owner, e.model, e.endpoint, e.status, e.requests,
             e.prompt_tokens, e.completion_tokens, e.duration_s)
            for e in entries
        ]  # fmt: skip

        def write() -> None:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(_UPSERT, rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

        if rows:
            await self._run(write)

    async def tokens_since(self, hour: int) -> list[tuple[str, str, str, int]]:
        """Tokens from `hour` on: (key id, owner, model, tokens) rows."""
        sql = (
            "SELECT key_id, owner, model, SUM(prompt_tokens + completion_tokens) "
            "FROM usage_hourly WHERE hour >= ? GROUP BY key_id, owner, model"
        )
        rows = await self._run(lambda: self._db.execute(sql, (hour,)).fetchall())
        return [(key_id, owner, model, int(tokens)) for key_id, owner, model, tokens in rows]

    async def totals(self, where: UsageFilter, by: str) -> list[UsageTotal]:
        group, second = GROUP_COLUMNS[by]
        clauses = ["hour >= ?"]
        args: list[object] = [where.since_hour]
        for column, value in (("owner", where.owner), ("key_id", where.key_id),
                              ("model", where.model)):  # fmt: skip
            if value:
                clauses.append(f"{column} = ?")
                args.append(value)
        sql = (
            f"SELECT {group} AS g, {second} AS s, SUM(requests), "
            "SUM(CASE WHEN status >= 400 THEN requests ELSE 0 END), "
            "SUM(prompt_tokens), SUM(completion_tokens), SUM(duration_s) "
            f"FROM usage_hourly WHERE {' AND '.join(clauses)} GROUP BY g, s ORDER BY g, s"
        )
        rows = await self._run(lambda: self._db.execute(sql, args).fetchall())
        return [
            UsageTotal(str(g), str(s), int(r), int(e), int(p), int(c), float(d))
            for g, s, r, e, p, c, d in rows
        ]

    async def prune(self, before_hour: int) -> int:
        """Drop hours before `before_hour` (retention); returns the rows dropped."""
        sql = "DELETE FROM usage_hourly WHERE hour < ?"
        cursor = await self._run(lambda: self._db.execute(sql, (before_hour,)))
        return int(cursor.rowcount)
