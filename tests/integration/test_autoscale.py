"""Scaling by load with real processes: a controller, a facade and agents (the
`openai` engine) in front of a paced bench/upstream.py, loaded by concurrent
OpenAI SDK streams."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionChunk

from kscope.v1 import control_pb2
from tests.procs import (
    Controller,
    Facade,
    scrape_metrics,
    start_controller,
    start_facade,
    start_upstream,
    stop_instances_left_behind,
    wait_until,
)

pytestmark = pytest.mark.autoscale

READY = control_pb2.INSTANCE_STATE_READY
LOAD_TOKENS = 25
"""max_tokens of each load stream."""


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Controller, Facade]]:
    tmp: Path = tmp_path_factory.mktemp("autoscale")
    paced = start_upstream(tmp, "--token-interval-ms", "20", name="paced")
    catalog = f"""
[[models]]
name = "scaled"
engine = "openai"
upstream_url = "{paced.url}"
max_replicas = 3
target_in_flight = 2
scale_up_window_s = 1
scale_down_window_s = 3
idle_timeout_s = 3
expected_startup_s = 3

[[models]]
name = "waited"
engine = "openai"
upstream_url = "{paced.url}"
expected_startup_s = 3
[models.env]
KSCOPE_AGENT_METRICS_PORT = "0"
KSCOPE_AGENT_METRICS_PORT_FILE = "{tmp / "agent-metrics.port"}"

[[models]]
name = "waited-stream"
engine = "openai"
upstream_url = "{paced.url}"
expected_startup_s = 3

[[models]]
name = "never"
engine = "openai"
upstream_url = "http://127.0.0.1:1/v1"
expected_startup_s = 3
"""
    controller = start_controller(tmp, catalog, env={
        "KSCOPE_RECONCILE_INTERVAL_S": "0.5", "KSCOPE_CONTROLLER_METRICS_PORT": "0",
        "KSCOPE_CONTROLLER_METRICS_PORT_FILE": str(tmp / "controller-metrics.port"),
    })  # fmt: skip
    facade = start_facade(tmp, controller, env={
        "KSCOPE_WAIT_PROGRESS_INTERVAL_S": "0.3", "KSCOPE_MAX_WAITING_PER_MODEL": "2",
    })  # fmt: skip
    try:
        yield controller, facade
    finally:
        facade.proc.stop()
        controller.proc.stop()
        stop_instances_left_behind(controller.state_dir)
        paced.proc.stop()


def _live(controller: Controller) -> list[control_pb2.Instance]:
    return controller.list_instances(model="scaled")


def _ready(controller: Controller) -> int:
    return sum(1 for i in _live(controller) if i.state == READY)


def _decisions(controller: Controller, model: str) -> list[tuple[str, str]]:
    """(action, reason) of the reconciler's decisions about `model`, oldest first."""
    with controller.channel() as channel:
        decided = (
            controller.stub(channel)
            .ListDecisions(control_pb2.ListDecisionsRequest(model=model), timeout=5)
            .decisions
        )
    return [(d.action, d.reason) for d in reversed(decided)]


def _content_chunks(stream: Iterable[ChatCompletionChunk]) -> int:
    """Chunks that carry generated text: one per token the upstream generated."""
    return sum(1 for c in stream if c.choices and c.choices[0].delta.content)


class Load:
    """Workers that each run one SDK stream after another until told to stop."""

    def __init__(self, facade: Facade):
        self._client = openai.OpenAI(
            base_url=f"{facade.base_url}/v1", api_key="none", max_retries=0, timeout=30
        )
        self._pool = ThreadPoolExecutor(max_workers=16)
        self._stops: list[threading.Event] = []
        self.done = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()

    def add(self, workers: int) -> None:
        for _ in range(workers):
            stop = threading.Event()
            self._stops.append(stop)
            self._pool.submit(self._work, stop)

    def remove(self, workers: int) -> None:
        for _ in range(workers):
            self._stops.pop().set()

    def _work(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                stream = self._client.chat.completions.create(
                    model="scaled", messages=[{"role": "user", "content": "hi"}],
                    max_tokens=LOAD_TOKENS, stream=True,
                )  # fmt: skip
                tokens = _content_chunks(stream)
                with self._lock:
                    if tokens == LOAD_TOKENS:
                        self.done += 1
                    else:
                        self.errors.append(f"{tokens} of {LOAD_TOKENS} tokens")
            except Exception as exc:
                with self._lock:
                    self.errors.append(repr(exc))

    def close(self) -> None:
        self.remove(len(self._stops))
        self._pool.shutdown(wait=True)


def test_scales_from_zero_to_max_under_load_and_back_to_zero(
    system: tuple[Controller, Facade],
) -> None:
    controller, facade = system
    client = openai.OpenAI(base_url=f"{facade.base_url}/v1", api_key="none", max_retries=0)
    # From zero: the first request is refused (503) and causes exactly one launch.
    with pytest.raises(openai.APIStatusError) as cold:
        client.chat.completions.create(model="scaled", messages=[{"role": "user", "content": "x"}])
    assert cold.value.status_code == 503
    wait_until(lambda: _ready(controller) == 1, 30, what="first instance ready")
    assert len(controller.list_instances(model="scaled", include_ended=True)) == 1

    load = Load(facade)
    try:
        # 8 streams at a time with a target of 2 each call for 4 instances: max is 3.
        load.add(8)
        most = 0

        def three_ready() -> bool:
            nonlocal most
            live = _live(controller)
            most = max(most, len(live))
            return sum(1 for i in live if i.state == READY) == 3

        wait_until(three_ready, 40, what="scaled up to max_replicas")
        busiest: dict[str, int] = {}
        for _ in range(10):  # it stays at max while the load stays above it
            live = _live(controller)
            most = max(most, len(live))
            for i in live:
                busiest[i.id] = max(busiest.get(i.id, 0), i.in_flight)
            time.sleep(0.2)
        assert most == 3, f"{most} instances at once; max_replicas is 3"
        assert len(busiest) == 3 and min(busiest.values()) >= 1, f"not spread: {busiest}"
        # The first launch was the demand's doing, the next the load's.
        launches = [r for a, r in _decisions(controller, "scaled") if a == "launch"]
        assert launches[0] == "0 of 1 wanted instances", launches
        assert any(r.startswith("1 of 3 wanted instances: load called") for r in launches)

        # The load drops to one stream at a time: drained down to one, every request served.
        load.remove(7)
        wait_until(lambda: len(_live(controller)) == 1, 30, what="scaled down to one")
        time.sleep(1.0)
        load.remove(1)
        # No requests: after idle_timeout_s the last one is drained and stopped.
        wait_until(lambda: not _live(controller), 30, what="scaled to zero")
    finally:
        load.close()
    assert not load.errors, load.errors[:5]
    assert load.done > 20
    reasons = _decisions(controller, "scaled")
    assert [a for a, _ in reasons].count("launch") == 3, reasons
    assert any(a == "launch" and "load called for 3 instances" in r for a, r in reasons)
    assert any(a == "drain" and "load called for at most 1" in r for a, r in reasons), reasons
    assert any(a == "drain" and "1 instances, 0 wanted" in r for a, r in reasons), reasons
    ended = controller.list_instances(model="scaled", include_ended=True)
    assert len(ended) == 3
    assert all(i.state == control_pb2.INSTANCE_STATE_STOPPED for i in ended), ended


def _chat(model: str, stream: bool = False) -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}],
                         "max_tokens": 5, "stream": stream})  # fmt: skip


def test_waiting_stream_gets_progress_comments_then_its_completion(
    system: tuple[Controller, Facade],
) -> None:
    controller, facade = system
    lines: list[str] = []
    started = time.monotonic()
    with httpx.stream(
        "POST", f"{facade.base_url}/v1/chat/completions", content=_chat("waited-stream", True),
        headers={"X-KScope-Wait": "60", "content-type": "application/json"}, timeout=70,
    ) as reply:  # fmt: skip
        assert reply.status_code == 200
        lines = [line for line in reply.iter_lines() if line]
    comments = [line for line in lines if line.startswith(":")]
    data = [line for line in lines if line.startswith("data: ")]
    assert comments, lines
    assert "waiting for model 'waited-stream'" in comments[0]
    assert "is ready after" in comments[-1]
    # A comment when the state changes, not only every interval.
    assert len({c.rsplit(";", 1)[0] for c in comments[:-1]}) >= 2, comments
    assert data[-1] == "data: [DONE]"
    chunks = [orjson.loads(d[6:]) for d in data[:-1]]
    assert all(not c.get("error") for c in chunks)
    tokens = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(tokens) == 5  # max_tokens
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(lines.index(c) < lines.index(data[0]) for c in comments)
    assert time.monotonic() - started < 30
    assert len(controller.list_instances(model="waited-stream", include_ended=True)) == 1


def test_waiting_with_the_sdk_simply_completes(system: tuple[Controller, Facade]) -> None:
    _, facade = system
    client = openai.OpenAI(base_url=f"{facade.base_url}/v1", api_key="none", max_retries=0)
    answer = client.chat.completions.create(
        model="waited", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
        extra_headers={"X-KScope-Wait": "60"},
    )  # fmt: skip
    assert answer.choices[0].finish_reason == "length"


def test_waiting_is_bounded_per_model_and_ends_with_503(
    system: tuple[Controller, Facade],
) -> None:
    _, facade = system
    url = f"{facade.base_url}/v1/chat/completions"
    wait = {"X-KScope-Wait": "2", "content-type": "application/json"}
    with ThreadPoolExecutor(max_workers=2) as pool:
        held = [pool.submit(httpx.post, url, content=_chat("never"), headers=wait, timeout=10)
                for _ in range(2)]  # fmt: skip
        time.sleep(0.5)
        refused = httpx.post(url, content=_chat("never"), headers=wait, timeout=10)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "too_many_waiting"
        assert int(refused.headers["retry-after"]) >= 1
        for future in held:
            ended = future.result()
            assert ended.status_code == 503
            assert ended.json()["error"]["code"] == "model_not_ready"
    # A waiting stream that runs out of time ends with an SSE error and [DONE].
    with httpx.stream("POST", url, content=_chat("never", True),
                      headers={**wait, "X-KScope-Wait": "1"}, timeout=10) as reply:  # fmt: skip
        lines = [line for line in reply.iter_lines() if line]
    assert lines[0].startswith(":") and lines[-1] == "data: [DONE]"
    assert orjson.loads(lines[-2][6:])["error"]["code"] == "model_not_ready"
    # Without the header: 503 + Retry-After at once, as before.
    bad = httpx.post(url, content=_chat("never"), headers={"X-KScope-Wait": "soon"}, timeout=10)
    assert bad.status_code == 400
    quick = httpx.post(url, content=_chat("never"), timeout=10)
    assert quick.status_code == 503 and int(quick.headers["retry-after"]) >= 1


def test_metrics_parse_and_counters_move(system: tuple[Controller, Facade]) -> None:
    controller, facade = system
    tmp = controller.state_dir.parent
    client = openai.OpenAI(base_url=f"{facade.base_url}/v1", api_key="none", max_retries=0)
    asked = 3  # max_tokens of each request
    received: list[int] = []  # chunks each stream brought the client

    def once() -> None:
        # With usage: the engine's own count of what it generated.
        chunks = list(client.chat.completions.create(
            model="waited", messages=[{"role": "user", "content": "hi"}], max_tokens=asked,
            stream=True, stream_options={"include_usage": True},
            extra_headers={"X-KScope-Wait": "60"},
        ))  # fmt: skip
        assert _content_chunks(chunks) == asked
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == asked
        received.append(len(chunks))

    once()  # the instance is READY (and its agent serves /metrics)
    received.clear()
    agent_port = int((tmp / "agent-metrics.port").read_text())
    controller_port = int((tmp / "controller-metrics.port").read_text())
    urls = {
        "facade": f"{facade.base_url}/metrics",
        "controller": f"http://127.0.0.1:{controller_port}/metrics",
        "agent": f"http://127.0.0.1:{agent_port}/metrics",
    }
    before = {name: scrape_metrics(url) for name, url in urls.items()}
    for _ in range(3):
        once()
    httpx.post(f"{facade.base_url}/v1/chat/completions", content=_chat("never"), timeout=10)
    time.sleep(1.2)  # the agent reports its load to the controller
    after = {name: scrape_metrics(url) for name, url in urls.items()}
    model = (("model", "waited"),)

    def moved(process: str, name: str, labels: tuple[tuple[str, str], ...] = ()) -> float:
        return after[process][(name, labels)] - before[process].get((name, labels), 0.0)

    ok = (("model", "waited"), ("status", "200"))
    assert moved("facade", "kscope_facade_requests_total", ok) == 3
    never = (("model", "never"), ("status", "503"))
    assert moved("facade", "kscope_facade_requests_total", never) == 1
    for histogram in ("request_duration_seconds", "time_to_first_token_seconds"):
        assert moved("facade", f"kscope_facade_{histogram}_count", model) == 3
        assert moved("facade", f"kscope_facade_{histogram}_sum", model) > 0
        assert moved("agent", f"kscope_agent_{histogram}_count", model) == 3
        inf = (("le", "+Inf"), ("model", "waited"))
        assert moved("agent", f"kscope_agent_{histogram}_bucket", inf) == 3
    assert moved("facade", "kscope_facade_stream_chunks_total") == sum(received)
    assert moved("facade", "kscope_facade_error_responses_total", (("status", "503"),)) >= 1
    assert after["facade"][("kscope_facade_ready_instances", model)] == 1
    assert moved("agent", "kscope_agent_requests_total", ok) == 3
    # What the engine generated, as its usage says: what was asked.
    assert moved("agent", "kscope_agent_generation_tokens_total", model) == 3 * asked
    assert after["agent"][("kscope_agent_in_flight_requests", model)] == 0
    assert after["controller"][
        ("kscope_controller_instances", (("model", "waited"), ("state", "ready")))
    ] == 1  # fmt: skip
    launches = ("kscope_controller_decisions_total", (("action", "launch"), ("model", "waited")))
    assert after["controller"][launches] >= 1
    assert ("kscope_controller_instance_failures_total", model) not in after["controller"]
    assert "process_cpu_seconds_total" in {name for name, _ in after["controller"]}
