"""The telemetry history in SQLite: the last `keep` records of each series (a
model, or one instance of it), so the history survives a controller restart."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from controller.store.base import SqliteFile
from kscope_common.request_stats import RequestTotals


@dataclass(frozen=True)
class Rates:
    """Rates and means since a series' previous record; 0 when nothing happened."""

    requests_per_second: float = 0.0
    tokens_per_second: float = 0.0
    errors_per_second: float = 0.0
    ttft_seconds: float = 0.0
    latency_seconds: float = 0.0


@dataclass(frozen=True)
class Record:
    """One sample of a model (instance_id empty) or of one instance."""

    model: str
    instance_id: str
    time_unix_seconds: float
    state: str
    in_flight: int
    queued: int
    ready_replicas: int
    live_replicas: int
    totals: RequestTotals
    """Since each agent started (summed over a model's live instances)."""
    rates: Rates

    def flat(self) -> dict[str, object]:
        """Every figure under its column (and proto field) name."""
        head = {name: getattr(self, name) for name in _HEAD}
        return {**head, **asdict(self.totals), **asdict(self.rates)}

    @staticmethod
    def from_row(row: tuple[object, ...]) -> Record:
        head, rest = row[: len(_HEAD)], row[len(_HEAD) :]
        totals = RequestTotals(*rest[:_N_TOTALS])  # type: ignore[arg-type]
        return Record(*head, totals, Rates(*rest[_N_TOTALS:]))  # type: ignore[arg-type, call-arg]


_HEAD = tuple(f.name for f in fields(Record) if f.name not in ("totals", "rates"))
_N_TOTALS = len(fields(RequestTotals))
_ALL_FIELDS = (
    *(f for f in fields(Record) if f.name in _HEAD),
    *fields(RequestTotals),
    *fields(Rates),
)
COLUMNS = tuple(f.name for f in _ALL_FIELDS)
_SQL_TYPES = {"str": "TEXT NOT NULL DEFAULT ''", "int": "INTEGER NOT NULL DEFAULT 0",
              "float": "REAL NOT NULL DEFAULT 0"}  # fmt: skip
_COLUMN_TYPES = {f.name: _SQL_TYPES[str(f.type)] for f in _ALL_FIELDS}
_SCHEMA = """
CREATE TABLE IF NOT EXISTS telemetry (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    time_unix_seconds REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS telemetry_series ON telemetry (model, instance_id, id);
"""


class TelemetryStore(SqliteFile):
    def __init__(self, path: Path):
        super().__init__(path, _SCHEMA)
        # The columns after the first three are added where missing, so a
        # database written by an older version gains the new ones.
        have = {row[1] for row in self._db.execute("PRAGMA table_info(telemetry)")}
        for name in COLUMNS:
            if name not in have:
                self._db.execute(f"ALTER TABLE telemetry ADD COLUMN {name} {_COLUMN_TYPES[name]}")

    async def add(self, records: list[Record], keep: int) -> None:
        """Append records, then keep only the last `keep` of each series."""
        rows = [tuple(r.flat().values()) for r in records]
        series = {(r.model, r.instance_id) for r in records}
        marks = ", ".join("?" * len(COLUMNS))
        sql = f"INSERT INTO telemetry ({', '.join(COLUMNS)}) VALUES ({marks})"

        def write() -> None:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany(sql, rows)
                for model, instance_id in series:
                    self._db.execute(
                        "DELETE FROM telemetry WHERE model = ? AND instance_id = ? AND id NOT IN"
                        " (SELECT id FROM telemetry WHERE model = ? AND instance_id = ?"
                        " ORDER BY id DESC LIMIT ?)",
                        (model, instance_id, model, instance_id, keep),
                    )

        await self._run(write)

    async def load(
        self, model: str = "", include_instances: bool = False, limit: int = 0
    ) -> list[Record]:
        """Oldest first; with `limit`, only the newest `limit` of each series."""
        where = "(? = '' OR model = ?)" + ("" if include_instances else " AND instance_id = ''")
        sql = (
            f"SELECT {', '.join(COLUMNS)} FROM (SELECT *, ROW_NUMBER() OVER"
            f" (PARTITION BY model, instance_id ORDER BY id DESC) AS age"
            f" FROM telemetry WHERE {where}) WHERE (? <= 0 OR age <= ?) ORDER BY id"
        )
        args = (model, model, limit, limit)
        rows = await self._run(lambda: self._db.execute(sql, args).fetchall())
        return [Record.from_row(row) for row in rows]

    async def newest(self) -> list[Record]:
        """The newest record of each series."""
        sql = (
            f"SELECT {', '.join(COLUMNS)} FROM telemetry WHERE id IN"
            " (SELECT MAX(id) FROM telemetry GROUP BY model, instance_id)"
        )
        rows = await self._run(lambda: self._db.execute(sql).fetchall())
        return [Record.from_row(row) for row in rows]
