"""Telemetry: each model's and instance's load, sampled at most every
MIN_UPDATE_INTERVAL_SECONDS, the last MAX_NUM_HISTORIC_RECORDS of each kept in
SQLite (controller/store/telemetry.py), served by ControlService.GetTelemetry
and POSTed as JSON to TELEMETRY_CALLBACK_URL when one is set.

Agents report totals since they started (requests, errors, tokens, sums of
TTFT and latency); a record's rates and means are the change since the series'
previous record, over the time between them."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp

from controller.fleet import Fleet
from controller.lifecycle import InstanceState
from controller.store.telemetry import Rates, Record, TelemetryStore
from kscope_common.request_stats import RequestTotals

log = logging.getLogger(__name__)

__all__ = ["Record", "Telemetry", "TelemetryStore", "change", "rates", "sample"]


def change(before: Record | None, now: RequestTotals) -> RequestTotals:
    """What a series did since its previous record. Counters that went down
    belong to a restarted agent: they count from zero."""
    if before is None or now.served < before.totals.served:
        return now
    return now - before.totals


def rates(delta: RequestTotals, seconds: float) -> Rates:
    """Rates and means of a change over `seconds`."""
    per_s = 1 / seconds if seconds > 0 else 0.0
    return Rates(
        requests_per_second=delta.served * per_s,
        tokens_per_second=delta.generation_tokens * per_s,
        errors_per_second=delta.errors * per_s,
        ttft_seconds=delta.ttft_seconds_sum / delta.ttft_count if delta.ttft_count else 0.0,
        latency_seconds=delta.latency_seconds_sum / delta.served if delta.served else 0.0,
    )


def sample(
    fleet: Fleet, now: float, previous: dict[tuple[str, str], Record], interval_s: float
) -> list[Record]:
    """One record per catalog model and one per live instance. `previous`: each
    series' last record; a series without one counts from zero over one interval."""

    def seconds_since(before: Record | None) -> float:
        return now - before.time_unix_seconds if before is not None else interval_s

    out: list[Record] = []
    summaries = {route.summary.spec.name: route.summary for route in fleet.routes()}
    for spec in fleet.catalog.models:
        per_instance: list[Record] = []
        model_change = RequestTotals()
        for inst in fleet.instances.values():
            if inst.model != spec.name or inst.state.ended:
                continue
            agent = fleet.agents.get(inst.agent_id)
            totals = agent.totals if agent else RequestTotals()
            before = previous.get((spec.name, inst.id))
            delta = change(before, totals)
            model_change += delta
            per_instance.append(
                Record(
                    model=spec.name,
                    instance_id=inst.id,
                    time_unix_seconds=now,
                    state=inst.state.value,
                    in_flight=agent.in_flight if agent else 0,
                    queued=agent.queued if agent else 0,
                    ready_replicas=int(inst.state is InstanceState.READY),
                    live_replicas=1,
                    totals=totals,
                    rates=rates(delta, seconds_since(before)),
                )
            )
        summary = summaries.get(spec.name)
        model_seconds = seconds_since(previous.get((spec.name, "")))
        out.append(
            Record(
                model=spec.name,
                instance_id="",
                time_unix_seconds=now,
                state=summary.state.value if summary else "",
                in_flight=sum(r.in_flight for r in per_instance),
                queued=sum(r.queued for r in per_instance),
                ready_replicas=sum(r.ready_replicas for r in per_instance),
                live_replicas=len(per_instance),
                totals=sum((r.totals for r in per_instance), RequestTotals()),
                rates=rates(model_change, model_seconds),
            )
        )
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
        previous = {(r.model, r.instance_id): r for r in await self.store.newest()}
        last = max((r.time_unix_seconds for r in previous.values()), default=0.0)
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
                    records = sample(self._fleet, now, previous, self._interval_s)
                    await self.store.add(records, self._keep)
                    previous = {(r.model, r.instance_id): r for r in records}
                    if self._callback_url:
                        await self._post(http, records)
                except Exception:
                    log.exception("telemetry sample failed")

    async def _post(self, http: aiohttp.ClientSession, records: list[Record]) -> None:
        try:
            async with http.post(
                self._callback_url, json={"records": [r.flat() for r in records]}
            ) as reply:
                if reply.status >= 400:
                    log.warning("telemetry callback answered %d", reply.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("telemetry callback %s failed: %s", self._callback_url, exc)
