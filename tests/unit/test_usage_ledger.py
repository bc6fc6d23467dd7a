"""The controller's usage ledger on a real SQLite file, with the clock given:
what one facade learns of the others, today's tokens, and facades that left."""

from __future__ import annotations

from pathlib import Path

from controller.store.usage import UsageEntry, UsageFilter, UsageStore
from controller.usage import DAY_S, STALE_AFTER_S, SubjectLoad, UsageLedger

NOW = 20 * DAY_S + 3600.0 * 5 + 17


def entry(key: str, owner: str, tokens: int, hour: float = NOW) -> UsageEntry:
    return UsageEntry(
        hour=int(hour) - int(hour) % 3600, key_id=key, owner=owner, model="m",
        endpoint="/v1/chat/completions", status=200, requests=1, prompt_tokens=tokens,
        completion_tokens=0, duration_s=0.5,
    )  # fmt: skip


async def test_each_facade_hears_the_others_and_everyones_tokens_today(tmp_path: Path) -> None:
    ledger = UsageLedger(UsageStore(tmp_path / "u.db"), retention_days=30)
    await ledger.report("a", [entry("k1", "ann", 10)], [SubjectLoad("key:k1", 3, 10, 1)], NOW)
    (seen,) = await ledger.report(
        "b", [entry("k1", "ann", 5)], [SubjectLoad("key:k1", 2, 5, 2)], NOW + 1
    )
    assert seen == SubjectLoad("key:k1", 3, 10, 1, tokens_today=15)  # a's live use, all tokens
    (seen,) = await ledger.report("a", [], [SubjectLoad("key:k1", 3, 10, 0)], NOW + 2)
    assert (seen.requests_last_minute, seen.in_flight, seen.tokens_today) == (2, 2, 15)
    rows = await ledger.totals(UsageFilter(since_hour=0), "key")
    assert [(r.group, r.requests, r.prompt_tokens) for r in rows] == [("k1", 2, 15)]
    ledger.close()


async def test_a_facade_that_stopped_reporting_counts_no_more(tmp_path: Path) -> None:
    ledger = UsageLedger(UsageStore(tmp_path / "u.db"), retention_days=30)
    await ledger.report("gone", [], [SubjectLoad("owner:ann", 9, 0, 4)], NOW)
    later = NOW + STALE_AFTER_S + 1
    (seen,) = await ledger.report("here", [], [SubjectLoad("owner:ann", 1, 0, 1)], later)
    assert (seen.requests_last_minute, seen.in_flight) == (0, 0)
    assert "gone" not in ledger._loads  # dropped, not kept forever
    ledger.close()


async def test_yesterdays_tokens_are_not_todays(tmp_path: Path) -> None:
    store = UsageStore(tmp_path / "u.db")
    await store.add([entry("k1", "ann", 100, hour=NOW - DAY_S)])
    ledger = UsageLedger(store, retention_days=30)
    (seen,) = await ledger.report("a", [entry("k1", "ann", 7)], [SubjectLoad("key:k1")], NOW)
    assert seen.tokens_today == 7
    ledger.close()


async def test_a_restarted_controller_still_knows_every_daily_budgets_use(tmp_path: Path) -> None:
    # A controller restart reloads today's tokens from the store: per key, per
    # owner and per key on one model (the catalog's key_limits) alike.
    first = UsageLedger(UsageStore(tmp_path / "u.db"), retention_days=30)
    await first.report("a", [entry("k1", "ann", 40)], [], NOW)
    first.close()
    again = UsageLedger(UsageStore(tmp_path / "u.db"), retention_days=30)
    subjects = [SubjectLoad(s) for s in ("key:k1", "owner:ann", "key:k1@m", "key:k1@other")]
    seen = await again.report("b", [], subjects, NOW + 60)
    assert [s.tokens_today for s in seen] == [40, 40, 40, 0]
    again.close()
