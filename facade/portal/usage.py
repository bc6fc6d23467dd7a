"""The usage page: the logged-in user's tokens per model per day over the last
30 days (a stacked bar chart and a table), and for the portal's admin users
everyone's totals per owner.

The figures come from the controller's UsageService.QueryUsage, asked with the
portal's admin service key; the owner is always the session's user, never a
form or query parameter, so nobody but an admin user sees another's figures.
The tables and the chart are built by pure functions from the reply's rows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import grpc

from facade.portal.charts import BarChart, BarSeries, stacked_bars
from kscope.v1 import usage_pb2, usage_pb2_grpc

log = logging.getLogger(__name__)

USAGE_DAYS = 30
"""The page covers today (UTC) and the days before it, this many in all."""
CHART_MODELS = 5
"""Models with a colour of their own in the chart; with more, the rest share one."""
OTHER_MODELS = "other models"
_DAY_S = 86400
_RPC_TIMEOUT_S = 5.0

NO_SERVICE_KEY = "Usage figures are not available on this server (no service key)."
UNREACHABLE = (
    "Usage figures are unavailable right now: the controller does not answer. "
    "Please try again shortly."
)


@dataclass(frozen=True)
class UsageLine:
    """One row of a usage table: a day and model, an owner, or a total."""

    group: str
    """The day ("YYYY-MM-DD", UTC) or the owner; "Total" on a total line."""
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class UsagePage:
    """What the usage page shows; `error` set means the user's own figures are missing."""

    first_day: str
    last_day: str
    lines: list[UsageLine]
    """The user's usage per day and model, newest day first."""
    total: UsageLine
    chart: BarChart | None
    owners: list[UsageLine] | None = None
    """Everyone's usage per owner, most tokens first; None unless the user is an admin."""
    owners_total: UsageLine | None = None
    error: str = ""
    owners_error: str = ""


class UsageUnavailable(Exception):
    """QueryUsage failed; the message is for the page."""


def last_days(now: float, count: int = USAGE_DAYS) -> list[str]:
    """The `count` days (UTC, "YYYY-MM-DD") up to and including `now`'s, oldest first."""
    today = int(now) - int(now) % _DAY_S
    return [
        time.strftime("%Y-%m-%d", time.gmtime(today - (count - 1 - i) * _DAY_S))
        for i in range(count)
    ]


def line_of(row: usage_pb2.UsageRow) -> UsageLine:
    return UsageLine(row.group, row.model, row.requests, row.prompt_tokens, row.completion_tokens)


def total_of(lines: Iterable[UsageLine]) -> UsageLine:
    lines = list(lines)
    return UsageLine(
        "Total", "",
        sum(x.requests for x in lines),
        sum(x.prompt_tokens for x in lines),
        sum(x.completion_tokens for x in lines),
    )  # fmt: skip


def day_model_lines(rows: Iterable[usage_pb2.UsageRow], days: Sequence[str]) -> list[UsageLine]:
    """The rows of `days` (per day and model), newest day first, then most tokens first."""
    wanted = set(days)
    lines = [line_of(r) for r in rows if r.group in wanted]
    lines.sort(key=lambda x: (x.model, x.group))
    lines.sort(key=lambda x: x.tokens, reverse=True)
    lines.sort(key=lambda x: x.group, reverse=True)
    return lines


def owner_lines(rows: Iterable[usage_pb2.UsageRow]) -> list[UsageLine]:
    """Per-owner rows, most tokens first, then by name."""
    return sorted((line_of(r) for r in rows), key=lambda x: (-x.tokens, x.group))


def tokens_chart(lines: Sequence[UsageLine], days: Sequence[str]) -> BarChart:
    """Tokens per day as stacked bars, a layer per model: the CHART_MODELS
    with most tokens in the period their own (biggest at the bottom), or
    CHART_MODELS - 1 and OTHER_MODELS for the rest when there are more."""
    by_model: dict[str, int] = {}
    for line in lines:
        by_model[line.model] = by_model.get(line.model, 0) + line.tokens
    ranked = sorted(by_model, key=lambda m: (-by_model[m], m))
    shown = ranked if len(ranked) <= CHART_MODELS else ranked[: CHART_MODELS - 1]
    names = [*shown, OTHER_MODELS] if len(shown) < len(ranked) else shown
    column = {day: i for i, day in enumerate(days)}
    values = {name: [0.0] * len(days) for name in names}
    for line in lines:
        if line.group in column:
            name = line.model if line.model in shown else OTHER_MODELS
            values[name][column[line.group]] += line.tokens
    series = [
        BarSeries(name, "u-other" if name == OTHER_MODELS else f"u-{i}", values[name])
        for i, name in enumerate(names)
    ]
    return stacked_bars(
        "tokens", "Tokens per day", days, series, empty_note="No requests in this period."
    )


async def _query(
    stub: usage_pb2_grpc.UsageServiceAsyncStub,
    metadata: tuple[tuple[str, str], ...],
    request: usage_pb2.QueryUsageRequest,
) -> list[usage_pb2.UsageRow]:
    try:
        reply = await stub.QueryUsage(request, metadata=metadata, timeout=_RPC_TIMEOUT_S)
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        log.warning("QueryUsage for the portal failed: %s", code.name)
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise UsageUnavailable(UNREACHABLE) from exc
        if code == grpc.StatusCode.UNIMPLEMENTED:
            raise UsageUnavailable("The controller does not record usage (it is too old).") from exc
        raise UsageUnavailable(f"Usage figures could not be read ({code.name}).") from exc
    return list(reply.rows)


def empty_page(days: Sequence[str], error: str) -> UsagePage:
    return UsagePage(days[0], days[-1], [], total_of(()), None, error=error)


async def usage_page(
    stub: usage_pb2_grpc.UsageServiceAsyncStub | None,
    metadata: tuple[tuple[str, str], ...],
    user: str,
    admin: bool,
    now: float,
) -> UsagePage:
    """The page's figures for `user` (and everyone's when `admin`); `stub` None:
    the portal has no service key."""
    days = last_days(now)
    if stub is None:
        return empty_page(days, NO_SERVICE_KEY)
    since = usage_pb2.QueryUsageRequest().since
    since.FromSeconds(int(now) - int(now) % _DAY_S - (len(days) - 1) * _DAY_S)
    try:
        rows = await _query(
            stub, metadata,
            usage_pb2.QueryUsageRequest(
                owner=user, since=since, by=usage_pb2.USAGE_GROUPING_DAY_MODEL
            ),
        )  # fmt: skip
    except UsageUnavailable as exc:
        return empty_page(days, str(exc))
    lines = day_model_lines(rows, days)
    page = UsagePage(days[0], days[-1], lines, total_of(lines), tokens_chart(lines, days))
    if not admin:
        return page
    try:
        everyone = await _query(
            stub, metadata,
            usage_pb2.QueryUsageRequest(since=since, by=usage_pb2.USAGE_GROUPING_OWNER),
        )  # fmt: skip
    except UsageUnavailable as exc:
        return replace(page, owners=[], owners_error=str(exc))
    owners = owner_lines(everyone)
    return replace(page, owners=owners, owners_total=total_of(owners))
