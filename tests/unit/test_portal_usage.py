"""The portal's usage page on its own: the days it covers, the tables and the
stacked bar chart built from QueryUsage rows, which queries it makes for a
user and for an admin user (a fake UsageService stub), its messages when the
controller cannot answer, and the template's admin-only table."""

from __future__ import annotations

import calendar
from pathlib import Path
from typing import Any

import grpc
import pytest
from jinja2 import Environment, FileSystemLoader, select_autoescape

from facade.portal import usage
from facade.portal.charts import BAR_HEIGHT, BAR_PAD_BOTTOM, PAD_Y, BarSeries, stacked_bars
from facade.portal.routes import limits_text
from facade.portal.usage import (
    CHART_MODELS,
    NO_SERVICE_KEY,
    OTHER_MODELS,
    UNREACHABLE,
    UsageLine,
    day_model_lines,
    last_days,
    owner_lines,
    tokens_chart,
    usage_page,
)
from kscope.v1 import keys_pb2, usage_pb2

NOW = calendar.timegm((2025, 3, 2, 15, 30, 0)) + 0.5
"""An afternoon (UTC) two days into March: the 30 days reach back into February."""
TEMPLATES = Path(usage.__file__).parent / "templates"


def _row(
    day: str, model: str, prompt: int, completion: int, requests: int = 1
) -> usage_pb2.UsageRow:
    return usage_pb2.UsageRow(
        group=day, model=model, requests=requests, prompt_tokens=prompt,
        completion_tokens=completion,
    )  # fmt: skip


def test_last_days_end_today_in_utc_oldest_first() -> None:
    days = last_days(NOW)
    assert len(days) == 30 and days[-1] == "2025-03-02" and days[-2] == "2025-03-01"
    assert days[-3] == "2025-02-28" and days[0] == "2025-02-01"
    assert last_days(calendar.timegm((2025, 3, 2, 0, 0, 0)), 2) == ["2025-03-01", "2025-03-02"]


def test_day_model_lines_newest_day_first_then_most_tokens() -> None:
    rows = [
        _row("2025-03-01", "alpha", 10, 5),
        _row("2025-03-02", "alpha", 1, 1),
        _row("2025-03-02", "beta", 30, 20, requests=4),
        _row("2024-12-01", "alpha", 999, 999),  # outside the 30 days: left out
    ]
    lines = day_model_lines(rows, last_days(NOW))
    assert [(x.group, x.model, x.tokens) for x in lines] == [
        ("2025-03-02", "beta", 50), ("2025-03-02", "alpha", 2), ("2025-03-01", "alpha", 15),
    ]  # fmt: skip
    assert lines[0] == UsageLine("2025-03-02", "beta", 4, 30, 20)
    assert usage.total_of(lines) == UsageLine("Total", "", 6, 41, 26)


def test_owner_lines_most_tokens_first() -> None:
    rows = [
        usage_pb2.UsageRow(group="bob", requests=1, prompt_tokens=5),
        usage_pb2.UsageRow(group="alice", requests=2, prompt_tokens=50, completion_tokens=1),
        usage_pb2.UsageRow(group="carol", requests=1, completion_tokens=5),
    ]
    assert [x.group for x in owner_lines(rows)] == ["alice", "bob", "carol"]


def test_stacked_bars_geometry() -> None:
    chart = stacked_bars(
        "t", "Tokens", ["d1", "d2", "d3", "d4"],
        [BarSeries("a", "u-0", [0, 30, 60, 0]), BarSeries("b", "u-1", [0, 10, 20, 0])],
    )  # fmt: skip
    assert chart.axis_max == "100"  # the tallest bar, 80, rounds up to 100
    assert chart.total == "120" and chart.peak == "80" and not chart.empty_note
    assert [b.css for b in chart.bars] == ["u-0", "u-1", "u-0", "u-1"]  # zeros draw nothing
    plot = BAR_HEIGHT - BAR_PAD_BOTTOM - PAD_Y
    a2, b2, a3, b3 = chart.bars
    assert a3.height == pytest.approx(0.6 * plot, abs=0.1)
    # "b" sits on "a": its bottom is a's top.
    assert b3.y + b3.height == pytest.approx(a3.y, abs=0.1)
    assert a3.y + a3.height == pytest.approx(chart.baseline_y, abs=0.1)
    # One slot each, left to right, with a gap between bars.
    assert a2.x == b2.x < a3.x and a2.x + a2.width < a3.x
    assert chart.left_x <= a2.x and a3.x + a3.width <= chart.right_x
    assert b2.label == "d2 b: 10"
    assert "d1 to d4: total 120" in chart.summary


def test_stacked_bars_with_nothing_and_bad_input() -> None:
    chart = stacked_bars("t", "T", ["d1", "d2"], [BarSeries("a", "u-0", [0, 0])])
    assert chart.bars == () and chart.empty_note and chart.axis_max == "1"
    with pytest.raises(ValueError, match="1 values for 2 slots"):
        stacked_bars("t", "T", ["d1", "d2"], [BarSeries("a", "u-0", [1])])


def test_tokens_chart_a_layer_per_model_biggest_first() -> None:
    days = last_days(NOW)
    lines = day_model_lines(
        [_row("2025-03-02", "small", 1, 1), _row("2025-03-01", "big", 100, 50),
         _row("2025-03-02", "big", 10, 0)],
        days,
    )  # fmt: skip
    chart = tokens_chart(lines, days)
    assert chart.legend == (("big", "u-0"), ("small", "u-1"))
    assert chart.slots == 30 and chart.first_slot == "2025-02-01"
    assert [b.label for b in chart.bars] == [
        "2025-03-01 big: 150", "2025-03-02 big: 10", "2025-03-02 small: 2",
    ]  # fmt: skip


def test_tokens_chart_lumps_the_smallest_models_together() -> None:
    days = last_days(NOW)
    rows = [_row("2025-03-02", f"m{i}", 100 - i, 0) for i in range(CHART_MODELS + 2)]
    chart = tokens_chart(day_model_lines(rows, days), days)
    names = [name for name, _ in chart.legend]
    assert names == [*(f"m{i}" for i in range(CHART_MODELS - 1)), OTHER_MODELS]
    other = [b for b in chart.bars if b.css == "u-other"]
    assert len(other) == 1 and other[0].label.endswith(f"{OTHER_MODELS}: 285")  # 96 + 95 + 94


class FakeUsageStub:
    """Stands in for UsageServiceStub: records the requests, answers by grouping."""

    def __init__(self, fail: grpc.StatusCode | None = None, fail_on_owner: bool = False):
        self.requests: list[usage_pb2.QueryUsageRequest] = []
        self.metadata: list[Any] = []
        self._fail = fail
        self._fail_on_owner = fail_on_owner

    async def QueryUsage(
        self, request: usage_pb2.QueryUsageRequest, metadata: Any = (), timeout: float = 0
    ) -> usage_pb2.QueryUsageResponse:
        self.requests.append(request)
        self.metadata.append(metadata)
        owners = request.by == usage_pb2.USAGE_GROUPING_OWNER
        if self._fail is not None and owners == self._fail_on_owner:
            raise grpc.aio.AioRpcError(
                self._fail, grpc.aio.Metadata(), grpc.aio.Metadata(), "down", ""
            )
        if owners:
            return usage_pb2.QueryUsageResponse(
                rows=[usage_pb2.UsageRow(group="alice", requests=1, prompt_tokens=7),
                      usage_pb2.UsageRow(group="mallory", requests=3, prompt_tokens=70)]
            )  # fmt: skip
        return usage_pb2.QueryUsageResponse(rows=[_row("2025-03-02", "alpha", 5, 2)])


AUTH = (("authorization", "Bearer ks-service"),)


async def test_a_user_gets_only_their_own_figures() -> None:
    stub = FakeUsageStub()
    page = await usage_page(stub, AUTH, "alice", admin=False, now=NOW)  # type: ignore[arg-type]
    assert len(stub.requests) == 1
    request = stub.requests[0]
    assert request.owner == "alice" and request.by == usage_pb2.USAGE_GROUPING_DAY_MODEL
    assert request.since.ToSeconds() == calendar.timegm((2025, 2, 1, 0, 0, 0))
    assert stub.metadata == [AUTH]
    assert page.owners is None and not page.error
    assert page.total == UsageLine("Total", "", 1, 5, 2) and page.chart is not None


async def test_an_admin_also_gets_everyone_per_owner() -> None:
    stub = FakeUsageStub()
    page = await usage_page(stub, AUTH, "bob", admin=True, now=NOW)  # type: ignore[arg-type]
    mine, everyone = stub.requests
    assert mine.owner == "bob"
    assert everyone.owner == "" and everyone.by == usage_pb2.USAGE_GROUPING_OWNER
    assert everyone.since == mine.since
    assert page.owners is not None and [x.group for x in page.owners] == ["mallory", "alice"]
    assert page.owners_total == UsageLine("Total", "", 4, 77, 0)


async def test_messages_when_usage_cannot_be_read() -> None:
    page = await usage_page(None, (), "alice", admin=True, now=NOW)
    assert page.error == NO_SERVICE_KEY and page.chart is None and page.owners is None
    stub = FakeUsageStub(grpc.StatusCode.UNAVAILABLE)
    page = await usage_page(stub, AUTH, "alice", admin=True, now=NOW)  # type: ignore[arg-type]
    assert page.error == UNREACHABLE and len(stub.requests) == 1
    stub = FakeUsageStub(grpc.StatusCode.PERMISSION_DENIED)
    page = await usage_page(stub, AUTH, "alice", admin=False, now=NOW)  # type: ignore[arg-type]
    assert "PERMISSION_DENIED" in page.error
    stub = FakeUsageStub(grpc.StatusCode.DEADLINE_EXCEEDED, fail_on_owner=True)
    page = await usage_page(stub, AUTH, "bob", admin=True, now=NOW)  # type: ignore[arg-type]
    assert not page.error and page.lines and page.owners == []
    assert page.owners_error == UNREACHABLE


def _render(**context: Any) -> str:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape())
    context.update(user="alice", csrf_field="csrf_token", csrf_token="t", page="usage")
    return env.get_template("usage.html").render(**context)


async def test_the_everyone_table_is_for_admins_only() -> None:
    page = await usage_page(FakeUsageStub(), AUTH, "bob", admin=True, now=NOW)  # type: ignore[arg-type]
    html = _render(usage=page, admin=True)
    assert 'id="usage-owners"' in html and 'data-owner="mallory"' in html
    assert 'data-model="alpha" data-tokens="7"' in html and "<rect" in html
    mine = await usage_page(FakeUsageStub(), AUTH, "alice", admin=False, now=NOW)  # type: ignore[arg-type]
    html = _render(usage=mine, admin=False)
    assert "usage-owners" not in html and "mallory" not in html
    assert 'aria-current="page">Usage' in html
    html = _render(usage=await usage_page(None, (), "alice", True, NOW), admin=True)
    assert NO_SERVICE_KEY in html and "<svg" not in html and "Everyone" not in html


def test_the_keys_page_says_a_keys_limits_in_words() -> None:
    assert limits_text(keys_pb2.Limits()) == "none"
    limits = keys_pb2.Limits(requests_per_minute=60, max_concurrent=4, daily_tokens=2_000_000)
    assert limits_text(limits) == "60 requests/min, 4 at once, 2,000,000 tokens/day"
