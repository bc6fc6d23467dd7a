"""SQLite store: catalog, instances and agents survive a controller restart.

sqlite3 blocks, so every call runs in a worker thread; one lock serialises
them on the single connection.
"""

from __future__ import annotations

import json
from pathlib import Path

from controller.catalog import Catalog, ModelSpec
from controller.lifecycle import InstanceState
from controller.records import AgentRecord, InstanceRecord
from controller.store.base import SqliteFile

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY,
    spec_json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS instances (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    launcher TEXT NOT NULL,
    seq INTEGER NOT NULL,
    created_at REAL NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    updated_at REAL NOT NULL,
    launcher_ref TEXT NOT NULL,
    launch_error TEXT NOT NULL,
    stop_requested INTEGER NOT NULL,
    stop_requested_at REAL NOT NULL,
    stop_sent INTEGER NOT NULL,
    agent_id TEXT NOT NULL,
    agent_address TEXT NOT NULL,
    engine_url TEXT NOT NULL,
    ever_registered INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS agents (
    id TEXT PRIMARY KEY,
    instance_id TEXT NOT NULL,
    address TEXT NOT NULL,
    hostname TEXT NOT NULL,
    models_json TEXT NOT NULL,
    engine TEXT NOT NULL,
    engine_url TEXT NOT NULL,
    pid INTEGER NOT NULL,
    registered_at REAL NOT NULL,
    last_report_at REAL NOT NULL
);
"""

_INSTANCE_COLUMNS = (
    "id model launcher seq created_at state reason updated_at launcher_ref launch_error "
    "stop_requested stop_requested_at stop_sent agent_id agent_address engine_url ever_registered"
).split()
_AGENT_COLUMNS = (
    "id instance_id address hostname models_json engine engine_url pid registered_at last_report_at"
).split()


class SqliteStore(SqliteFile):
    """The controller's durable state in one SQLite file."""

    def __init__(self, path: Path):
        super().__init__(path, _SCHEMA)

    # --- catalog -----------------------------------------------------------------------------

    async def save_catalog(self, catalog: Catalog) -> None:
        """Replace the stored catalog with this one."""
        rows = [(m.name, m.model_dump_json()) for m in catalog.models]

        def write() -> None:
            with self._db:
                self._db.execute("BEGIN")
                self._db.execute("DELETE FROM models")
                self._db.executemany("INSERT INTO models VALUES (?, ?)", rows)

        await self._run(write)

    async def load_catalog(self) -> Catalog:
        rows = await self._run(
            lambda: self._db.execute("SELECT spec_json FROM models ORDER BY name").fetchall()
        )
        return Catalog(models=tuple(ModelSpec.model_validate_json(r[0]) for r in rows))

    # --- instances ---------------------------------------------------------------------------

    async def save_instance(self, inst: InstanceRecord) -> None:
        row = (
            inst.id, inst.model, inst.launcher, inst.seq, inst.created_at, inst.state.value,
            inst.reason, inst.updated_at, inst.launcher_ref, inst.launch_error,
            int(inst.stop_requested), inst.stop_requested_at, int(inst.stop_sent), inst.agent_id,
            inst.agent_address, inst.engine_url, int(inst.ever_registered),
        )  # fmt: skip
        sql = (
            f"INSERT OR REPLACE INTO instances ({', '.join(_INSTANCE_COLUMNS)}) "
            f"VALUES ({', '.join('?' * len(_INSTANCE_COLUMNS))})"
        )
        await self._run(lambda: self._db.execute(sql, row))

    async def load_instances(self) -> list[InstanceRecord]:
        sql = f"SELECT {', '.join(_INSTANCE_COLUMNS)} FROM instances ORDER BY seq"
        rows = await self._run(lambda: self._db.execute(sql).fetchall())
        out = []
        for row in rows:
            values = dict(zip(_INSTANCE_COLUMNS, row, strict=True))
            values["state"] = InstanceState(values["state"])
            for flag in ("stop_requested", "stop_sent", "ever_registered"):
                values[flag] = bool(values[flag])
            out.append(InstanceRecord(**values))
        return out

    # --- agents ------------------------------------------------------------------------------

    async def save_agent(self, agent: AgentRecord) -> None:
        row = (
            agent.id, agent.instance_id, agent.address, agent.hostname, json.dumps(agent.models),
            agent.engine, agent.engine_url, agent.pid, agent.registered_at, agent.last_report_at,
        )  # fmt: skip
        sql = (
            f"INSERT OR REPLACE INTO agents ({', '.join(_AGENT_COLUMNS)}) "
            f"VALUES ({', '.join('?' * len(_AGENT_COLUMNS))})"
        )
        await self._run(lambda: self._db.execute(sql, row))

    async def delete_agent(self, agent_id: str) -> None:
        await self._run(lambda: self._db.execute("DELETE FROM agents WHERE id = ?", (agent_id,)))

    async def load_agents(self) -> list[AgentRecord]:
        sql = f"SELECT {', '.join(_AGENT_COLUMNS)} FROM agents"
        rows = await self._run(lambda: self._db.execute(sql).fetchall())
        out = []
        for row in rows:
            values = dict(zip(_AGENT_COLUMNS, row, strict=True))
            values["models"] = json.loads(values.pop("models_json"))
            out.append(AgentRecord(**values))
        return out
