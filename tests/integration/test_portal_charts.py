"""The portal's model page: charts of the controller's telemetry (requests,
latency, instances) as inline SVG, with real processes (controller sampling
often, an agent with the `openai` engine in front of bench/upstream.py, a
facade with a local portal user) and the `openai` SDK sending traffic; and the
chart geometry of facade/portal/charts.py on its own."""

from __future__ import annotations

import contextlib
import re
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from facade.portal import charts
from facade.portal.charts import SeriesSpec, line_chart, model_charts, nice_max, scale, span_label
from kscope.v1 import control_pb2
from tests.procs import (
    ROOT,
    Controller,
    Facade,
    start_controller,
    start_facade,
    start_upstream,
    stop_instances_left_behind,
    wait_until,
)

pytestmark = pytest.mark.autoscale

PASSWORD = "chart-viewer-pw-7"
KEEP = 8
"""MAX_NUM_HISTORIC_RECORDS: once full, every page shows exactly this many samples."""
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]

# --- charts.py on its own -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, 1), (-3, 1), (float("nan"), 1), (0.3, 0.5), (0.2, 0.2), (1, 1), (1.1, 2), (2.2, 2.5),
     (3, 5), (7, 10), (10, 10), (11, 20), (2400, 2500)],
)  # fmt: skip
def test_nice_max_rounds_up_to_1_2_2_5_5(value: float, expected: float) -> None:
    assert nice_max(value) == pytest.approx(expected)


def test_scale_maps_time_to_x_and_value_to_y() -> None:
    points = scale([100.0, 101.0, 104.0], [0.0, 5.0, 10.0], y_max=10.0)
    left, right = charts.PAD_LEFT, charts.WIDTH - charts.PAD_RIGHT
    top, bottom = charts.PAD_Y, charts.HEIGHT - charts.PAD_Y
    assert [p.x for p in points] == pytest.approx([left, left + (right - left) / 4, right], abs=0.1)
    assert [p.y for p in points] == pytest.approx([bottom, (top + bottom) / 2, top], abs=0.1)


def test_scale_clamps_and_handles_empty_and_single_points() -> None:
    assert scale([], [], y_max=1) == []
    [lone] = scale([5.0], [0.5], y_max=1)
    assert lone.x == charts.WIDTH - charts.PAD_RIGHT  # a lone sample is the newest
    high, low = scale([0.0, 1.0], [50.0, -1.0], y_max=10)
    assert high.y == charts.PAD_Y and low.y == charts.HEIGHT - charts.PAD_Y
    with pytest.raises(ValueError, match="2 times but 1 values"):
        scale([0.0, 1.0], [1.0], y_max=1)


def test_span_labels() -> None:
    assert span_label(0) == "one sample"
    assert span_label(45) == "last 45 s"
    assert span_label(600) == "last 10 min"
    assert span_label(3 * 3600) == "last 3 h"
    assert span_label(3 * 86400) == "last 3 d"


def test_line_chart_of_nothing_single_point_and_all_zeros() -> None:
    empty = line_chart("x", "X", [], [SeriesSpec("x", "s-x", [])])
    assert empty.samples == 0 and empty.series[0].lines == () and empty.empty_note
    assert empty.series[0].latest == charts.NO_VALUE and empty.series[0].dot is None

    single = line_chart("x", "X", [10.0], [SeriesSpec("x", "s-x", [2.0], fill=True)])
    assert single.span == "one sample" and single.axis_max == "2" and not single.empty_note
    [series] = single.series
    assert series.lines == (f"{charts.WIDTH - charts.PAD_RIGHT},{charts.PAD_Y}",)
    assert series.area == ""  # no area under a lone point
    assert series.dot is not None and series.latest == "2" and series.maximum == "2"

    zeros = line_chart("x", "X", [0.0, 1.0, 2.0], [SeriesSpec("x", "s-x", [0.0] * 3, fill=True)])
    assert zeros.axis_max == "1" and not zeros.empty_note  # a flat line at the bottom
    assert {p.split(",")[1] for p in zeros.series[0].lines[0].split()} == {
        f"{charts.HEIGHT - charts.PAD_Y}"
    }
    assert zeros.series[0].area  # filled (flat) under a line of several points


def test_zero_is_a_gap_for_means_over_no_requests() -> None:
    chart = line_chart(
        "lat", "Latency", [0.0, 1.0, 2.0, 3.0, 4.0],
        [SeriesSpec("latency", "s-latency", [0.2, 0.4, 0.0, 0.3, 0.0], zero_is_gap=True)],
        fmt=charts.format_seconds,
    )  # fmt: skip
    [series] = chart.series
    assert [len(line.split()) for line in series.lines] == [2, 1]
    assert series.samples == 3 and series.maximum == "400 ms" and chart.axis_max == "500 ms"
    assert series.latest == charts.NO_VALUE and series.dot is None  # the newest is a gap
    idle = [SeriesSpec("latency", "s-latency", [0.0, 0.0], zero_is_gap=True)]
    none = line_chart("lat", "Latency", [0.0, 1.0], idle)
    assert none.series[0].lines == () and none.empty_note


def test_model_charts_from_records() -> None:
    records = [
        control_pb2.TelemetryRecord(
            model="m", time_unix_seconds=1000.0 + 60 * i, ready_replicas=min(i, 2),
            live_replicas=2, requests_per_second=1.5 * i, latency_seconds=0.5, ttft_seconds=0.1,
        )
        for i in range(11)
    ]  # fmt: skip
    requests, latency, instances = model_charts(records)
    assert requests.span == "last 10 min" and requests.samples == 11
    assert requests.series[0].latest == "15" and requests.axis_max == "20"
    assert [s.name for s in latency.series] == ["latency", "TTFT"]
    assert latency.series[1].latest == "100 ms"
    ready, live = instances.series
    assert ready.latest_value == 2 and live.maximum == "2" and instances.axis_max == "2"
    assert len(ready.lines[0].split()) == 11
    assert "Instances, last 10 min, 11 samples" in instances.summary


# --- the model page with real processes -----------------------------------------------------


@dataclass
class System:
    controller: Controller
    facade: Facade
    upstream_url: str

    def records(self, model: str) -> list[control_pb2.TelemetryRecord]:
        with self.controller.channel() as channel:
            reply = self.controller.stub(channel).GetTelemetry(
                control_pb2.GetTelemetryRequest(model=model), timeout=5
            )
        return list(reply.records)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.facade.base_url}/v1", api_key="unused", max_retries=0, timeout=10
        )


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    tmp = tmp_path_factory.mktemp("charts")
    upstream = start_upstream(tmp)
    catalog = f"""
[[models]]
name = "alpha"
engine = "openai"
upstream_url = "{upstream.url}"
min_replicas = 1
expected_startup_s = 3

[[models]]
name = "org/cold-one"
engine = "openai"
upstream_url = "{upstream.url}"
min_replicas = 0
expected_startup_s = 3
"""
    env = {"MIN_UPDATE_INTERVAL_SECONDS": "0.3", "MAX_NUM_HISTORIC_RECORDS": str(KEEP)}
    controller = start_controller(tmp, catalog, env=env)
    users = tmp / "users.toml"
    subprocess.run(
        [str(ROOT / ".venv" / "bin" / "kscope"), "users", "add", "vera", "--file", str(users),
         "--password-stdin"],
        input=f"{PASSWORD}\n", text=True, check=True, timeout=30, capture_output=True,
    )  # fmt: skip
    facade = start_facade(tmp, controller, env={"KSCOPE_PORTAL_USERS_FILE": str(users)})
    system = System(controller, facade, upstream.url)
    try:
        wait_until(
            lambda: any(
                i.state == control_pb2.INSTANCE_STATE_READY
                for i in controller.list_instances("alpha")
            ),
            30, what="alpha ready",
        )  # fmt: skip
        yield system
    finally:
        facade.proc.stop()
        controller.proc.stop()
        stop_instances_left_behind(controller.state_dir)
        upstream.proc.stop()


def _csrf(page: httpx.Response) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert match, page.text
    return match.group(1)


@contextlib.contextmanager
def _logged_in(system: System) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{system.facade.base_url}/portal", timeout=10) as http:
        form = http.get("/login")
        done = http.post(
            "/login", data={"username": "vera", "password": PASSWORD, "csrf_token": _csrf(form)}
        )
        assert done.status_code == 303, done.text
        yield http


def _figure(page: str, key: str) -> ET.Element:
    """One chart's <figure>, parsed (the template writes it as well-formed XML)."""
    match = re.search(rf'<figure class="chart" id="chart-{key}".*?</figure>', page, re.S)
    assert match, f"no {key} chart in:\n{page}"
    return ET.fromstring(match.group(0))


def _polylines(figure: ET.Element, series: str) -> list[list[tuple[float, float]]]:
    return [
        [(float(x), float(y)) for x, y in (p.split(",") for p in line.attrib["points"].split())]
        for line in figure.iter("polyline")
        if line.attrib["data-series"] == series
    ]


def test_model_page_charts_real_telemetry(system: System) -> None:
    client = system.client()
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            client.chat.completions.create(model="alpha", messages=HI)
            time.sleep(0.05)

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    try:
        # Traffic across a full window of KEEP samples, the newest with alpha ready.
        started = time.time()
        wait_until(
            lambda: (r := system.records("alpha")) and len(r) == KEEP
            and r[0].time_unix_seconds > started and r[-1].ready_replicas == 1,
            30, what=f"{KEEP} samples of alpha taken while it served",
        )  # fmt: skip
    finally:
        stop.set()
        sender.join(15)
    served_before = system.records("alpha")[-1].served
    assert served_before > 0

    with _logged_in(system) as http:
        page = http.get("/models/alpha")
    assert page.status_code == 200, page.text
    assert "READY" in page.text and "No history yet" not in page.text
    served = re.search(r"<dt>Served</dt><dd>(\d+) requests", page.text)
    assert served and int(served.group(1)) >= served_before
    assert 'http-equiv="refresh"' in page.text

    for key in ("requests", "latency", "instances"):
        figure = _figure(page.text, key)
        assert figure.attrib["data-samples"] == str(KEEP)
        svg = figure.find("svg")
        assert svg is not None and svg.attrib["role"] == "img"
        title, desc = svg.find("title"), svg.find("desc")
        assert title is not None and title.text and title.text.endswith(" s")  # "..., last 2 s"
        assert desc is not None and desc.text and f"{KEEP} samples" in desc.text
        assert svg.attrib["aria-labelledby"] == f"chart-{key}-title chart-{key}-desc"

    instances = _figure(page.text, "instances")
    [ready_line] = _polylines(instances, "ready")
    assert len(ready_line) == KEEP
    assert ready_line[-1][1] == charts.PAD_Y  # 1 ready of an axis up to 1: at the top
    legend = {li.attrib["data-series"]: li for li in instances.iter("li")}
    assert float(legend["ready"].attrib["data-latest"]) == 1
    assert float(legend["live"].attrib["data-latest"]) == 1
    assert instances.find("svg/polygon") is not None  # the area under "ready"
    assert [t.text for t in instances.iter("text")][:2] == ["1", "0"]  # the axis: 0 to 1

    requests = _figure(page.text, "requests")
    [requests_line] = _polylines(requests, "requests/s")
    assert len(requests_line) == KEEP


def _legend(figure: ET.Element) -> dict[str, str]:
    """Each series' legend line: "name: latest X, max Y"."""
    return {li.attrib["data-series"]: "".join(li.itertext()) for li in figure.iter("li")}


def _largest(legend_line: str) -> float:
    """The "max" of a legend line as a number (k for thousands, ms for milliseconds)."""
    found = re.search(r"max ([\d.]+)(k| ms| s)?$", legend_line)
    assert found, legend_line
    scale_by = {"k": 1000.0, " ms": 0.001}.get(found.group(2) or "", 1.0)
    return float(found.group(1)) * scale_by


def test_requests_and_latency_charts_show_the_traffic(system: System) -> None:
    # First a whole window (KEEP samples) without traffic, so the earlier tests'
    # requests are out of the page: whatever it shows after is this test's.
    wait_until(
        lambda: (r := system.records("alpha")) and len(r) == KEEP
        and all(x.requests_per_second == 0 for x in r),
        30, what=f"{KEEP} quiet samples",
    )  # fmt: skip
    quiet_until = system.records("alpha")[-1].time_unix_seconds
    client = system.client()
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            client.chat.completions.create(model="alpha", messages=HI)

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    try:
        wait_until(
            lambda: sum(1 for r in system.records("alpha")
                        if r.time_unix_seconds > quiet_until and r.requests_per_second > 0) >= 2,
            15, what="two samples of this test's requests",
        )  # fmt: skip
        with _logged_in(system) as http:
            page = http.get("/models/alpha").text
        ours = [r for r in system.records("alpha") if r.time_unix_seconds > quiet_until]
    finally:
        stop.set()
        sender.join(15)
    busy = [r for r in ours if r.requests_per_second > 0]
    assert len(busy) >= 2, ours
    assert all(r.latency_seconds > 0 for r in busy), busy
    requests = _legend(_figure(page, "requests"))
    assert _largest(requests["requests/s"]) > 0, page
    latency = _figure(page, "latency")
    assert _polylines(latency, "latency"), "no latency drawn while requests finished"
    assert _largest(_legend(latency)["latency"]) > 0, page
    assert "No request finished in this period." not in page


def test_model_page_for_a_cold_model_with_a_slash_in_its_name(system: System) -> None:
    wait_until(lambda: len(system.records("org/cold-one")) >= 2, 20, what="cold samples")
    with _logged_in(system) as http:
        models = http.get("/models")
        assert 'href="/portal/models/alpha"' in models.text
        assert 'href="/portal/models/org/cold-one"' in models.text
        page = http.get("/models/org/cold-one")
    assert page.status_code == 200 and "COLD" in page.text
    instances = _figure(page.text, "instances")
    [ready_line] = _polylines(instances, "ready")
    assert {y for _, y in ready_line} == {charts.HEIGHT - charts.PAD_Y}  # 0 all along
    latency = _figure(page.text, "latency")
    assert not _polylines(latency, "latency")  # no request, so no mean: a note, no dip
    assert "No request finished in this period." in page.text


def test_unknown_model_is_404_and_pages_need_a_login(system: System) -> None:
    with _logged_in(system) as http:
        missing = http.get("/models/no-such-model")
    assert missing.status_code == 404 and "No such model" in missing.text
    with httpx.Client(base_url=f"{system.facade.base_url}/portal", timeout=10) as anonymous:
        for path in ("/models/alpha", "/models/no-such-model"):
            refused = anonymous.get(path)
            assert refused.status_code == 303 and refused.headers["location"] == "/portal/login"


def test_page_still_renders_when_the_controller_is_gone(system: System) -> None:
    """Last in this module: it stops the controller."""
    with _logged_in(system) as http:
        system.controller.proc.kill()
        started = time.monotonic()
        page = http.get("/models/alpha")
        took = time.monotonic() - started
    assert page.status_code == 200
    assert "the controller does not answer" in page.text
    assert 'id="chart-' not in page.text
    assert "<code>alpha</code>" in page.text  # the last route table is still shown
    assert took < 6
