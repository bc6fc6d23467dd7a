"""Usage and live limit counters, gathered from the facades.

Each facade reports about once a second (facade/usage.py): the usage of the
requests that ended since its last report, and its live counters for every
limited key and owner. The ledger adds the usage to the store in one
transaction per report and answers with what the other facades are using, so
each facade can enforce a limit with the whole cluster's figures at most a
report old. Nothing here runs per request.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from controller.store.usage import UsageEntry, UsageFilter, UsageStore, UsageTotal

log = logging.getLogger(__name__)

HOUR_S = 3600
DAY_S = 86400
STALE_AFTER_S = 5.0
"""A facade's live counters count this long after its last report (then it
is taken as gone: its requests cannot still be running unseen for long)."""
PRUNE_EVERY_S = 3600.0


@dataclass(frozen=True)
class SubjectLoad:
    """A limited key's or owner's live use, as one facade sees it."""

    subject: str
    """"key:<key id>" or "owner:<owner>"."""
    requests_last_minute: int = 0
    tokens_last_minute: int = 0
    in_flight: int = 0
    tokens_today: int = 0


def day_start(now: float) -> int:
    return int(now) - int(now) % DAY_S


class UsageLedger:
    """The controller's side of usage: totals in the store, live counters in memory."""

    def __init__(self, store: UsageStore, retention_days: float):
        self._store = store
        self._retention_s = retention_days * DAY_S
        self._loads: dict[str, tuple[float, dict[str, SubjectLoad]]] = {}
        """Facade → (when it reported, its counters by subject)."""
        self._today = -1
        self._tokens_today: dict[str, int] = {}
        """Subject → tokens since the start of `_today` (UTC), from every facade."""
        self._pruned_at = 0.0

    async def _roll(self, now: float) -> None:
        """Load today's token totals when the day changed (and at the first report)."""
        today = day_start(now)
        if today == self._today:
            return
        self._tokens_today = {}
        for key_id, owner, model, tokens in await self._store.tokens_since(today):
            self._count(key_id, owner, model, tokens)
        self._today = today

    def _count(self, key_id: str, owner: str, model: str, tokens: int) -> None:
        # Every daily budget a request counts against: its key's, its owner's and
        # its key's on this model (the catalog's key_limits).
        for subject in (f"key:{key_id}", f"owner:{owner}", f"key:{key_id}@{model}"):
            self._tokens_today[subject] = self._tokens_today.get(subject, 0) + tokens

    async def report(
        self,
        facade: str,
        entries: Iterable[UsageEntry],
        loads: Iterable[SubjectLoad],
        now: float,
    ) -> list[SubjectLoad]:
        """Take one facade's report; return the others' use of the subjects it reported."""
        entries = list(entries)
        await self._roll(now)
        await self._store.add(entries)  # first: a failed write leaves the report to be resent
        for entry in entries:
            if entry.hour >= self._today:
                self._count(entry.key_id, entry.owner, entry.model, entry.tokens)
        mine = {load.subject: load for load in loads}
        # A facade that stopped reporting is gone (each process has its own
        # name, so restarts would otherwise pile up here).
        self._loads = {
            name: seen for name, seen in self._loads.items() if now - seen[0] <= STALE_AFTER_S
        }
        self._loads[facade] = (now, mine)
        if now - self._pruned_at >= PRUNE_EVERY_S:
            self._pruned_at = now
            dropped = await self._store.prune(int(now - self._retention_s) // HOUR_S * HOUR_S)
            if dropped:
                log.info("usage: dropped %d hourly rows older than the retention", dropped)
        return [self._others(facade, subject) for subject in mine]

    def _others(self, facade: str, subject: str) -> SubjectLoad:
        requests = tokens = in_flight = 0
        for name, (_, loads) in self._loads.items():  # all fresh: report() dropped the rest
            load = loads.get(subject)
            if name == facade or load is None:
                continue
            requests += load.requests_last_minute
            tokens += load.tokens_last_minute
            in_flight += load.in_flight
        return SubjectLoad(subject, requests, tokens, in_flight, self._tokens_today.get(subject, 0))

    async def totals(self, where: UsageFilter, by: str) -> list[UsageTotal]:
        return await self._store.totals(where, by)

    def close(self) -> None:
        self._store.close()
