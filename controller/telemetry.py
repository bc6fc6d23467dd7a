"""Telemetry: each model's and instance's load, sampled at most every
MIN_UPDATE_INTERVAL_SECONDS, the last MAX_NUM_HISTORIC_RECORDS of each kept in
SQLite (so the history survives a restart), served by ControlService.GetTelemetry
and POSTed as JSON to TELEMETRY_CALLBACK_URL when one is set."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp

from controller.fleet import Fleet
from controller.lifecycle import InstanceState
from controller.store.base import SqliteFile

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS telemetry (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    time_unix_seconds REAL NOT NULL,
    in_flight INTEGER NOT NULL,
    queued INTEGER NOT NULL,
    ready_replicas INTEGER NOT NULL,
    live_replicas INTEGER NOT NULL,
    served INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS telemetry_series ON telemetry (model, instance_id, id);
"""
_COLUMNS = (
    "model instance_id time_unix_seconds in_flight queued ready_replicas live_replicas served"
).split()


@dataclass(frozen=True)
class Record:
    model: str
    instance_id: str
    """Empty for the model's own record."""
    time_unix_seconds: float
    in_flight: int
    queued: int
    ready_replicas: int
    live_replicas: int
    served: int


class TelemetryStore(SqliteFile):
    def __init__(self, path: Path):
        super().__init__(path, _SCHEMA)

    async def add(self, records: list[Record], keep: int) -> None:
        """Append records, then keep only the last `keep` of each series."""
        rows = [tuple(asdict(r).values()) for r in records]
        series = {(r.model, r.instance_id) for r in records}
        sql = f"INSERT INTO telemetry ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * 8)})"

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

    async def newest_time(self) -> float:
        row = await self._run(
            lambda: self._db.execute("SELECT MAX(time_unix_seconds) FROM telemetry").fetchone()
        )
        return float(row[0]) if row and row[0] is not None else 0.0

    async def load(self, model: str = "", include_instances: bool = False) -> list[Record]:
        sql = f"SELECT {', '.join(_COLUMNS)} FROM telemetry WHERE (? = '' OR model = ?)"
        if not include_instances:
            sql += " AND instance_id = ''"
        sql += " ORDER BY id"
        rows = await self._run(lambda: self._db.execute(sql, (model, model)).fetchall())
        return [Record(*row) for row in rows]


def sample(fleet: Fleet, now: float) -> list[Record]:
    """One record per catalog model and one per live instance."""
    out: list[Record] = []
    for spec in fleet.catalog.models:
        insts = [i for i in fleet.instances.values() if i.model == spec.name]
        per_instance: list[Record] = []
        for inst in insts:
            if inst.state.ended:
                continue
            agent = fleet.agents.get(inst.agent_id)
            ready = int(inst.state is InstanceState.READY)
            per_instance.append(
                Record(spec.name, inst.id, now, agent.in_flight if agent else 0,
                       agent.queued if agent else 0, ready, 1, agent.served if agent else 0)
            )  # fmt: skip
        out.append(
            Record(
                spec.name, "", now, sum(r.in_flight for r in per_instance),
                sum(r.queued for r in per_instance), sum(r.ready_replicas for r in per_instance),
                len(per_instance), sum(r.served for r in per_instance),
            )
        )  # fmt: skip
        out.extend(per_instance)
    return out


class Telemetry:
    """Samples the fleet on its own task."""

    def __init__(
        self,
        fleet: Fleet,
        store: TelemetryStore,
        interval_s: float,
        keep: int,
        callback_url: str = "",
    ):
        self._fleet = fleet
        self.store = store
        self._interval_s = interval_s
        self._keep = keep
        self._callback_url = callback_url

    async def run(self) -> None:
        last = await self.store.newest_time()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            while True:
                # Never more often than the interval, across restarts too.
                now = time.time()
                wait = last + self._interval_s - now
                if wait > 0:
                    await asyncio.sleep(wait)
                    now = time.time()
                last = now
                try:
                    records = sample(self._fleet, now)
                    await self.store.add(records, self._keep)
                    if self._callback_url:
                        await self._post(http, records)
                except Exception:
                    log.exception("telemetry sample failed")

    async def _post(self, http: aiohttp.ClientSession, records: list[Record]) -> None:
        try:
            async with http.post(
                self._callback_url, json={"records": [asdict(r) for r in records]}
            ) as reply:
                if reply.status >= 400:
                    log.warning("telemetry callback answered %d", reply.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("telemetry callback %s failed: %s", self._callback_url, exc)
