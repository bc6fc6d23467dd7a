"""Small line charts of a model's telemetry, laid out here and drawn as inline SVG
by the template (no script, nothing fetched: the portal's CSP allows neither).

Pure functions from samples to geometry: x follows each sample's time (gaps in
sampling stay visible), y runs from 0 at the bottom to a round axis maximum at
the top.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kscope.v1 import control_pb2

WIDTH = 320
"""The SVG's width and height in its own units (CSS scales it to fit)."""
HEIGHT = 120
PAD_LEFT = 52
"""Room left of the plot for the axis labels."""
PAD_RIGHT = 8
PAD_Y = 10
_NICE_STEPS = (1.0, 2.0, 2.5, 5.0, 10.0)
NO_VALUE = "n/a"
"""Shown for the latest or largest value of a series with nothing to show."""

Formatter = Callable[[float], str]


def nice_max(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of ten at or above `value`; 1 for 0 or less
    (so a flat zero line sits on the bottom of a 0 to 1 axis)."""
    if not math.isfinite(value) or value <= 0:
        return 1.0
    base = 10.0 ** math.floor(math.log10(value))
    for step in _NICE_STEPS:
        # The tolerance keeps 0.2/0.1 = 2.0000000000000004 at step 2.
        if value <= step * base * (1 + 1e-9):
            return step * base
    return 10.0 * base


def format_number(value: float) -> str:
    """A count or rate, short: 0, 0.25, 3.5, 12, 1.2k."""
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value / 1000:.3g}k"
    if abs(value) >= 10:
        return f"{value:.0f}"
    return f"{value:.3g}"


def format_seconds(value: float) -> str:
    """A duration: 0 s, 85 ms, 1.25 s."""
    if value == 0:
        return "0 s"
    if abs(value) < 1:
        return f"{value * 1000:.3g} ms"
    return f"{value:.3g} s"


def span_label(seconds: float) -> str:
    """The time a series covers, as the chart states it: "last 45 s", "last 10 min"."""
    if seconds <= 0:
        return "one sample"
    if seconds < 90:
        return f"last {seconds:.0f} s"
    if seconds < 90 * 60:
        return f"last {seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"last {seconds / 3600:.3g} h"
    return f"last {seconds / 86400:.3g} d"


@dataclass(frozen=True)
class Point:
    x: float
    y: float


def scale(
    times: Sequence[float],
    values: Sequence[float],
    y_max: float,
    width: float = WIDTH,
    height: float = HEIGHT,
) -> list[Point]:
    """Each (time, value) as a point in the plot area: the first time at the
    left edge, the last at the right (a lone sample at the right), 0 at the
    bottom, `y_max` at the top; values outside 0..y_max are clamped."""
    if len(times) != len(values):
        raise ValueError(f"{len(times)} times but {len(values)} values")
    if not times:
        return []
    left, right = PAD_LEFT, width - PAD_RIGHT
    top, bottom = PAD_Y, height - PAD_Y
    start, span = times[0], times[-1] - times[0]
    points = []
    for t, v in zip(times, values, strict=True):
        x = right if span <= 0 else left + (t - start) / span * (right - left)
        share = min(max(v / y_max, 0.0), 1.0) if y_max > 0 else 0.0
        points.append(Point(round(x, 1), round(bottom - share * (bottom - top), 1)))
    return points


def _points_attr(points: Sequence[Point]) -> str:
    return " ".join(f"{p.x:g},{p.y:g}" for p in points)


@dataclass(frozen=True)
class Series:
    """One line of a chart, ready for the template."""

    name: str
    """Its name in the legend: "ready", "latency"."""
    css: str
    """Its CSS class (colour, dash)."""
    lines: tuple[str, ...]
    """`points` attributes of its polylines: one, or several where a series
    has gaps (a latency sample with no finished request)."""
    area: str
    """`points` of the filled polygon under it; empty for no fill."""
    samples: int
    """How many samples it draws."""
    latest: str
    """The newest sample, formatted; NO_VALUE when the newest is a gap."""
    latest_value: float | None
    maximum: str
    """The largest sample, formatted; NO_VALUE when there is none."""
    dot: Point | None
    """Where the newest sample is drawn (a marker), if it is not a gap."""


@dataclass(frozen=True)
class Chart:
    """A small chart: geometry for the SVG, text for around it."""

    key: str
    """Part of element ids: "requests"."""
    title: str
    series: tuple[Series, ...]
    axis_max: str
    """The label at the top of the y axis (the bottom is 0)."""
    span: str
    """"last 10 min"."""
    samples: int
    empty_note: str
    """Set when there is nothing to draw (all samples are gaps)."""
    baseline_y: float = HEIGHT - PAD_Y
    top_y: float = PAD_Y
    left_x: float = PAD_LEFT
    right_x: float = WIDTH - PAD_RIGHT
    width: int = WIDTH
    height: int = HEIGHT

    @property
    def summary(self) -> str:
        """One sentence for screen readers (the SVG's description)."""
        parts = [f"{s.name} latest {s.latest}, max {s.maximum}" for s in self.series]
        return f"{self.title}, {self.span}, {self.samples} samples: " + "; ".join(parts) + "."


@dataclass(frozen=True)
class SeriesSpec:
    """What to draw for one series, before scaling."""

    name: str
    css: str
    values: Sequence[float]
    fill: bool = False
    zero_is_gap: bool = False
    """0 means "no data" (a mean over no requests): leave a gap, not a dip."""


def _segments(points: Sequence[Point], present: Sequence[bool]) -> list[list[Point]]:
    runs: list[list[Point]] = []
    current: list[Point] = []
    for point, here in zip(points, present, strict=True):
        if here:
            current.append(point)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def line_chart(
    key: str,
    title: str,
    times: Sequence[float],
    specs: Sequence[SeriesSpec],
    fmt: Formatter = format_number,
    empty_note: str = "Nothing to draw yet.",
) -> Chart:
    """Lay out one chart of `specs` over `times` (oldest first), all series on
    one y axis from 0 to a round maximum."""
    present = [[not (s.zero_is_gap and v == 0) for v in s.values] for s in specs]
    drawn = [
        v
        for spec, here in zip(specs, present, strict=True)
        for v, h in zip(spec.values, here, strict=True)
        if h
    ]
    y_max = nice_max(max(drawn, default=0.0))
    series = []
    for spec, here in zip(specs, present, strict=True):
        points = scale(times, spec.values, y_max)
        runs = _segments(points, here)
        kept = [v for v, h in zip(spec.values, here, strict=True) if h]
        area = ""
        if spec.fill and len(runs) == 1 and len(runs[0]) > 1:
            run = runs[0]
            floor = HEIGHT - PAD_Y
            area = _points_attr([*run, Point(run[-1].x, floor), Point(run[0].x, floor)])
        newest = spec.values[-1] if spec.values and here[-1] else None
        series.append(
            Series(
                name=spec.name, css=spec.css,
                lines=tuple(_points_attr(r) for r in runs), area=area, samples=len(kept),
                latest=NO_VALUE if newest is None else fmt(newest), latest_value=newest,
                maximum=fmt(max(kept)) if kept else NO_VALUE,
                dot=points[-1] if newest is not None else None,
            )
        )  # fmt: skip
    return Chart(
        key=key, title=title, series=tuple(series), axis_max=fmt(y_max),
        span=span_label(times[-1] - times[0]) if times else "no samples",
        samples=len(times), empty_note="" if drawn else empty_note,
    )  # fmt: skip


def model_charts(records: Sequence[control_pb2.TelemetryRecord]) -> list[Chart]:
    """The model page's charts from its telemetry (oldest first): requests per
    second, latency (mean latency and TTFT) and instances (ready and live)."""
    times = [r.time_unix_seconds for r in records]
    return [
        line_chart(
            "requests", "Requests per second", times,
            [SeriesSpec("requests/s", "s-requests", [r.requests_per_second for r in records],
                        fill=True)],
        ),
        line_chart(
            "latency", "Latency", times,
            [SeriesSpec("latency", "s-latency", [r.latency_seconds for r in records],
                        zero_is_gap=True),
             SeriesSpec("TTFT", "s-ttft", [r.ttft_seconds for r in records], zero_is_gap=True)],
            fmt=format_seconds, empty_note="No request finished in this period.",
        ),
        line_chart(
            "instances", "Instances", times,
            [SeriesSpec("ready", "s-ready", [float(r.ready_replicas) for r in records],
                        fill=True),
             SeriesSpec("live", "s-live", [float(r.live_replicas) for r in records])],
        ),
    ]  # fmt: skip


# --- stacked bars (the usage page) -----------------------------------------------------------

BAR_WIDTH = 640
"""The bar chart's SVG width and height (one bar per day: wider than the line charts)."""
BAR_HEIGHT = 160
BAR_PAD_BOTTOM = 22
"""Room under the plot for the first and last slot's labels."""
_BAR_GAP = 0.25
"""The share of each slot left empty between bars."""


@dataclass(frozen=True)
class BarSeries:
    """One layer of a stacked bar chart, before scaling: a value per slot."""

    name: str
    css: str
    values: Sequence[float]


@dataclass(frozen=True)
class Bar:
    """One drawn segment of a stacked bar."""

    x: float
    y: float
    width: float
    height: float
    css: str
    label: str
    """The segment's tooltip: "2025-05-01 alpha: 1.2k"."""


@dataclass(frozen=True)
class BarChart:
    """Stacked bars, one per slot (a day), on one y axis from 0 to a round maximum."""

    key: str
    title: str
    bars: tuple[Bar, ...]
    legend: tuple[tuple[str, str], ...]
    """(name, css) of each series, bottom layer first."""
    axis_max: str
    first_slot: str
    last_slot: str
    slots: int
    peak: str
    """The largest slot's total, formatted."""
    total: str
    """All slots' sum, formatted."""
    empty_note: str
    """Set when every slot is 0."""
    baseline_y: float = BAR_HEIGHT - BAR_PAD_BOTTOM
    top_y: float = PAD_Y
    left_x: float = PAD_LEFT
    right_x: float = BAR_WIDTH - PAD_RIGHT
    width: int = BAR_WIDTH
    height: int = BAR_HEIGHT

    @property
    def summary(self) -> str:
        """One sentence for screen readers (the SVG's description)."""
        names = ", ".join(name for name, _ in self.legend) or "nothing"
        return (
            f"{self.title}, {self.first_slot} to {self.last_slot}: total {self.total}, "
            f"largest day {self.peak}; series: {names}."
        )


def stacked_bars(
    key: str,
    title: str,
    slots: Sequence[str],
    series: Sequence[BarSeries],
    fmt: Formatter = format_number,
    empty_note: str = "Nothing to draw yet.",
) -> BarChart:
    """Lay out one bar per slot (oldest first), each stacking `series` bottom
    up in order; zero values draw nothing."""
    for s in series:
        if len(s.values) != len(slots):
            raise ValueError(f"{s.name}: {len(s.values)} values for {len(slots)} slots")
    sums = [sum(s.values[i] for s in series) for i in range(len(slots))]
    y_max = nice_max(max(sums, default=0.0))
    top, bottom = PAD_Y, BAR_HEIGHT - BAR_PAD_BOTTOM
    left, right = PAD_LEFT, BAR_WIDTH - PAD_RIGHT
    slot_w = (right - left) / max(len(slots), 1)
    bars = []
    for i, slot in enumerate(slots):
        base = 0.0
        for s in series:
            value = s.values[i]
            if value <= 0:
                continue
            y0 = bottom - min(base / y_max, 1.0) * (bottom - top)
            y1 = bottom - min((base + value) / y_max, 1.0) * (bottom - top)
            base += value
            bars.append(
                Bar(
                    x=round(left + (i + _BAR_GAP / 2) * slot_w, 1), y=round(y1, 1),
                    width=round(slot_w * (1 - _BAR_GAP), 1), height=round(y0 - y1, 1),
                    css=s.css, label=f"{slot} {s.name}: {fmt(value)}",
                )
            )  # fmt: skip
    return BarChart(
        key=key, title=title, bars=tuple(bars),
        legend=tuple((s.name, s.css) for s in series), axis_max=fmt(y_max),
        first_slot=slots[0] if slots else "", last_slot=slots[-1] if slots else "",
        slots=len(slots), peak=fmt(max(sums, default=0.0)), total=fmt(sum(sums)),
        empty_note="" if any(sums) else empty_note,
    )  # fmt: skip
