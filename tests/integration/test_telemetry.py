"""Telemetry history with real processes: sampled no more often than
MIN_UPDATE_INTERVAL_SECONDS, the last MAX_NUM_HISTORIC_RECORDS kept, POSTed to
TELEMETRY_CALLBACK_URL, and still there after a controller restart."""

from __future__ import annotations

import http.server
import itertools
import json
import threading
from pathlib import Path

import grpc
import pytest

from kscope.v1 import control_pb2
from tests.procs import (
    Controller,
    restart_controller,
    start_controller,
    start_upstream,
    stop_instances_left_behind,
    wait_until,
)

pytestmark = pytest.mark.autoscale


def _records(ctl: Controller, instances: bool = False) -> list[control_pb2.TelemetryRecord]:
    with grpc.insecure_channel(ctl.address) as channel:
        reply = ctl.stub(channel).GetTelemetry(
            control_pb2.GetTelemetryRequest(model="t", include_instances=instances), timeout=5
        )
    return list(reply.records)


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
    catalog = f"""
[[models]]
name = "t"
engine = "openai"
upstream_url = "{upstream.url}"
min_replicas = 1
expected_startup_s = 3
"""
    env = {
        "MIN_UPDATE_INTERVAL_SECONDS": "0.4",
        "MAX_NUM_HISTORIC_RECORDS": "4",
        "TELEMETRY_CALLBACK_URL": f"http://127.0.0.1:{callback.server_port}/telemetry",
    }
    ctl = start_controller(tmp_path, catalog, env=env)
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
