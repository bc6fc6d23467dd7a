"""Telemetry figures from agents' totals, and the store across schema versions."""

from __future__ import annotations

import sqlite3
from dataclasses import astuple
from pathlib import Path

import pytest

from controller.store.telemetry import Rates, Record, TelemetryStore
from controller.telemetry import change, rates
from kscope_common.request_stats import RequestTotals


def _record(totals: RequestTotals, at: float = 100.0) -> Record:
    return Record("m", "i-1", at, "ready", 0, 0, 1, 1, totals, Rates())


def test_change_since_the_previous_record() -> None:
    now = RequestTotals(8, 1, 80, 0.8, 8, 4.0)
    assert change(None, now) == now
    delta = change(_record(RequestTotals(5, 1, 50, 0.5, 5, 2.5)), now)
    assert astuple(delta) == pytest.approx((3, 0, 30, 0.3, 3, 1.5))


def test_a_restarted_agent_counts_from_zero() -> None:
    now = RequestTotals(2, 0, 20, 0.2, 2, 1.0)
    assert change(_record(RequestTotals(50, 0, 500, 5.0, 50, 25.0)), now) == now


def test_rates_and_means_over_the_window() -> None:
    figures = rates(RequestTotals(10, 2, 300, 0.5, 5, 20.0), 5.0)
    assert figures == Rates(
        requests_per_second=2.0, tokens_per_second=60.0, errors_per_second=0.4,
        ttft_seconds=0.1, latency_seconds=2.0,
    )  # fmt: skip
    assert rates(RequestTotals(), 5.0) == Rates()  # nothing happened: zeros, no division
    assert rates(RequestTotals(3), 0.0).requests_per_second == 0.0


async def test_a_database_of_the_older_schema_gains_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "kscope.db"
    with sqlite3.connect(path) as db:
        db.executescript(
            """
            CREATE TABLE telemetry (
                id INTEGER PRIMARY KEY AUTOINCREMENT, model TEXT NOT NULL,
                instance_id TEXT NOT NULL, time_unix_seconds REAL NOT NULL,
                in_flight INTEGER NOT NULL, queued INTEGER NOT NULL,
                ready_replicas INTEGER NOT NULL, live_replicas INTEGER NOT NULL,
                served INTEGER NOT NULL);
            INSERT INTO telemetry (model, instance_id, time_unix_seconds, in_flight, queued,
                ready_replicas, live_replicas, served) VALUES ('m', '', 50.0, 1, 2, 1, 1, 9);
            """
        )
    store = TelemetryStore(path)
    try:
        (old,) = await store.load("m")
        assert (old.in_flight, old.queued, old.totals.served, old.state) == (1, 2, 9, "")
        assert old.rates == Rates()
        new = _record(RequestTotals(3, 1, 30, 0.3, 3, 1.5), at=60.0)
        await store.add([new, _record(RequestTotals(4), at=61.0)], keep=1)
        assert await store.load("m", include_instances=True) == [
            old, _record(RequestTotals(4), at=61.0)
        ]  # fmt: skip
        assert {(r.instance_id, r.time_unix_seconds) for r in await store.newest()} == {
            ("", 50.0), ("i-1", 61.0)
        }  # fmt: skip
    finally:
        store.close()


@pytest.mark.parametrize("keep", [1, 3])
async def test_only_the_last_records_of_each_series_are_kept(tmp_path: Path, keep: int) -> None:
    store = TelemetryStore(tmp_path / "t.db")
    try:
        for at in range(5):
            await store.add([_record(RequestTotals(at), at=float(at))], keep)
        kept = await store.load("m", include_instances=True)
        assert [r.time_unix_seconds for r in kept] == [float(t) for t in range(5 - keep, 5)]
    finally:
        store.close()


async def test_a_limit_gives_the_newest_of_each_series(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path / "t.db")
    try:
        for at in range(5):
            model = Record("m", "", float(at), "ready", 0, 0, 1, 1, RequestTotals(), Rates())
            await store.add([model, _record(RequestTotals(at), at=float(at))], keep=10)
        newest = await store.load("m", include_instances=True, limit=2)
        assert [(r.instance_id, r.time_unix_seconds) for r in newest] == [
            ("", 3.0), ("i-1", 3.0), ("", 4.0), ("i-1", 4.0)
        ]  # fmt: skip
        assert len(await store.load("m", limit=0)) == 5
        assert len(await store.load("other")) == 0
    finally:
        store.close()
