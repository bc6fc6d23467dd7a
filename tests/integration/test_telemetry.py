"""Telemetry history with real processes: sampled no more often than
MIN_UPDATE_INTERVAL_SECONDS, the last MAX_NUM_HISTORIC_RECORDS kept, POSTed to
TELEMETRY_CALLBACK_URL, and still there after a controller restart."""

from __future__ import annotations

import http.server
import itertools
import json
import threading
from pathlib import Path

import openai
import pytest

from kscope.v1 import control_pb2
from tests.procs import (
    Controller,
    Upstream,
    restart_controller,
    start_controller,
    start_facade,
    start_upstream,
    stop_instances_left_behind,
    wait_until,
)

pytestmark = pytest.mark.autoscale


def _records(ctl: Controller, instances: bool = False) -> list[control_pb2.TelemetryRecord]:
    with ctl.channel() as channel:
        reply = ctl.stub(channel).GetTelemetry(
            control_pb2.GetTelemetryRequest(model="t", include_instances=instances), timeout=5
        )
    return list(reply.records)


def _catalog(upstream: Upstream) -> str:
    """One model, always running, in front of bench/upstream.py."""
    return f"""
[[models]]
name = "t"
engine = "openai"
upstream_url = "{upstream.url}"
min_replicas = 1
expected_startup_s = 3
"""


def test_traffic_shows_as_rates_and_means_per_model_and_instance(tmp_path: Path) -> None:
    upstream = start_upstream(tmp_path)
    env = {"MIN_UPDATE_INTERVAL_SECONDS": "0.5", "MAX_NUM_HISTORIC_RECORDS": "500"}
    ctl = start_controller(tmp_path, _catalog(upstream), env=env)
    facade = start_facade(tmp_path, ctl)
    try:
        wait_until(lambda: _records(ctl) and _records(ctl)[-1].ready_replicas == 1, 20,
                   what="instance ready")  # fmt: skip
        client = openai.OpenAI(base_url=f"{facade.base_url}/v1", api_key="none", max_retries=0)
        start = _records(ctl)[-1].time_unix_seconds
        streamed, unary = [3, 4, 5, 6], 2  # max_tokens asked for
        for asked in streamed:
            # With usage: the engine's own count of the tokens it generated.
            chunks = list(client.chat.completions.create(
                model="t", messages=[{"role": "user", "content": "hi"}], max_tokens=asked,
                stream=True, stream_options={"include_usage": True},
            ))  # fmt: skip
            assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == asked
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == asked
        done = client.completions.create(model="t", prompt="hi", max_tokens=unary)
        assert done.usage is not None and done.usage.completion_tokens == unary
        # The agent reports within a second; then a sample or two later the window shows it.
        wait_until(lambda: _records(ctl)[-1].served == 5, 20, what="5 requests served")
        after = [r for r in _records(ctl, instances=True) if r.time_unix_seconds > start]
        (instance_id,) = {r.instance_id for r in after} - {""}
        for series in ("", instance_id):
            records = [r for r in after if r.instance_id == series]
            assert records[-1].state == "ready"
            assert records[-1].errors == 0
            # Each record's rate covers the time since the one before: they add up.
            spans = [b - a for a, b in itertools.pairwise(
                [start, *(r.time_unix_seconds for r in records)])]  # fmt: skip
            requests = sum(r.requests_per_second * t for r, t in zip(records, spans, strict=True))
            tokens = sum(r.tokens_per_second * t for r, t in zip(records, spans, strict=True))
            assert requests == pytest.approx(5, rel=0.02), records
            assert tokens == pytest.approx(sum(streamed) + unary, rel=0.02), records
            busy = [r for r in records if r.requests_per_second > 0]
            assert all(r.latency_seconds > 0 for r in busy)
            assert any(r.ttft_seconds > 0 for r in busy)
    finally:
        facade.proc.stop()
        ctl.proc.stop()
        stop_instances_left_behind(ctl.state_dir)
        upstream.proc.stop()


def test_telemetry_respects_interval_and_count_and_survives_a_restart(tmp_path: Path) -> None:
    posted: list[dict[str, object]] = []

    class Callback(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            posted.append(json.loads(body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    callback = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Callback)
    threading.Thread(target=callback.serve_forever, daemon=True).start()
    upstream = start_upstream(tmp_path)
    env = {
        "MIN_UPDATE_INTERVAL_SECONDS": "0.4",
        "MAX_NUM_HISTORIC_RECORDS": "4",
        "TELEMETRY_CALLBACK_URL": f"http://127.0.0.1:{callback.server_port}/telemetry",
    }
    ctl = start_controller(tmp_path, _catalog(upstream), env=env)
    try:
        wait_until(lambda: len(_records(ctl)) == 4, 20, what="4 records")
        wait_until(lambda: _records(ctl)[-1].ready_replicas == 1, 20, what="instance ready")
        records = _records(ctl)
        assert len(records) == 4  # never more than MAX_NUM_HISTORIC_RECORDS
        times = [r.time_unix_seconds for r in records]
        assert all(b - a >= 0.39 for a, b in itertools.pairwise(times)), times
        with_instances = _records(ctl, instances=True)
        assert {r.instance_id for r in with_instances} - {""}, "no instance records"
        assert posted and posted[-1]["records"][0]["model"] == "t"  # type: ignore[index]

        before = _records(ctl)
        ctl.proc.stop()
        ctl = restart_controller(ctl, tmp_path)
        after = _records(ctl)
        assert after and after[0].time_unix_seconds <= before[-1].time_unix_seconds
        assert len(after) <= 4
        wait_until(lambda: _records(ctl)[-1].time_unix_seconds > before[-1].time_unix_seconds,
                   10, what="sampling again")  # fmt: skip
        times = [r.time_unix_seconds for r in _records(ctl)]
        assert all(b - a >= 0.39 for a, b in itertools.pairwise(times)), times
    finally:
        ctl.proc.stop()
        stop_instances_left_behind(ctl.state_dir)
        upstream.proc.stop()
        callback.shutdown()
