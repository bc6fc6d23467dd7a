"""The operator commands against real processes, as an operator types them:
tables for people, --json for scripts, an admin key over TLS."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
from collections.abc import Iterator

import pytest

from kscope.v1 import control_pb2
from tests.procs import (
    Controller,
    run_kscope,
    start_controller,
    start_upstream,
    stop_instances_left_behind,
    wait_until,
)


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Controller]:
    tmp = tmp_path_factory.mktemp("operate")
    upstream = start_upstream(tmp)
    ctl = start_controller(
        tmp,
        f'[[models]]\nname = "echo"\nengine = "openai"\nupstream_url = "{upstream.url}"\n'
        "min_replicas = 1\nexpected_startup_s = 3\n",
        env={"MIN_UPDATE_INTERVAL_SECONDS": "0.5"},
    )
    try:
        ready = control_pb2.INSTANCE_STATE_READY
        wait_until(lambda: any(i.state == ready for i in ctl.list_instances("echo")), 30,
                   what="echo ready")  # fmt: skip
        yield ctl
    finally:
        ctl.proc.stop()
        upstream.proc.stop()
        stop_instances_left_behind(ctl.state_dir)


def kscope(ctl: Controller, *args: str, key: bool = True) -> subprocess.CompletedProcess[str]:
    return run_kscope(ctl, *args, key=ctl.admin_key if key else "")


def test_status_shows_models_instances_agents_and_the_controller(controller: Controller) -> None:
    table = kscope(controller, "status")
    assert table.returncode == 0, table.stderr
    assert f"controller {controller.address}: answering" in table.stdout
    assert "echo" in table.stdout and "1 READY" in table.stdout
    assert "agents connected: 1" in table.stdout
    data = json.loads(kscope(controller, "status", "--json").stdout)
    assert [m["name"] for m in data["models"]] == ["echo"]
    assert [i["model"] for i in data["instances"]] == ["echo"]
    assert len(data["agents"]) == 1 and data["controller"]["answered_ms"] > 0
    refused = kscope(controller, "status", key=False)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr


def test_decisions_and_telemetry(controller: Controller) -> None:
    launched = json.loads(kscope(controller, "decisions", "--model", "echo", "--json").stdout)
    assert launched and launched[-1]["action"] == "launch"
    assert "wanted" in launched[-1]["reason"]
    assert "launch" in kscope(controller, "decisions").stdout
    wait_until(lambda: json.loads(kscope(controller, "telemetry", "echo", "--json").stdout),
               15, 0.5, what="a telemetry sample")  # fmt: skip
    samples = json.loads(kscope(controller, "telemetry", "echo", "--since", "10m",
                                "--json").stdout)  # fmt: skip
    assert samples and all(s["model"] == "echo" for s in samples)
    assert "(model)" in kscope(controller, "telemetry", "echo").stdout
    bad = kscope(controller, "telemetry", "echo", "--since", "soon")
    assert bad.returncode == 2 and "15m" in bad.stderr


def test_stop_drains_and_ends_the_instance(controller: Controller) -> None:
    (first,) = [i for i in controller.list_instances("echo")
                if i.state == control_pb2.INSTANCE_STATE_READY]  # fmt: skip
    done = kscope(controller, "stop", first.id)
    assert done.returncode == 0, done.stderr
    assert f"stopping {first.id} (echo)" in done.stdout

    def stopped() -> bool:
        return any(i.id == first.id and i.state == control_pb2.INSTANCE_STATE_STOPPED
                   for i in controller.list_instances("echo", include_ended=True))  # fmt: skip

    wait_until(stopped, 20, what="the instance stopped")
    missing = kscope(controller, "drain", "no-such-instance")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr


def test_scale_changes_the_bounds_and_the_fleet_follows(controller: Controller) -> None:
    ready = control_pb2.INSTANCE_STATE_READY

    def ready_count() -> int:
        return sum(1 for i in controller.list_instances("echo") if i.state == ready)

    wait_until(lambda: ready_count() == 1, 30, what="one instance")
    up = kscope(controller, "scale", "echo", "--min", "2", "--max", "2", "--json")
    assert up.returncode == 0, up.stderr
    assert json.loads(up.stdout)["min_replicas"] == 2
    wait_until(lambda: ready_count() == 2, 30, what="a second instance for min_replicas 2")
    wrong = kscope(controller, "scale", "echo", "--min", "3")  # above max: refused
    assert wrong.returncode == 1 and "INVALID_ARGUMENT" in wrong.stderr
    assert "min_replicas" in wrong.stderr
    down = kscope(controller, "scale", "echo", "--min", "1", "--max", "1")
    assert down.returncode == 0 and "echo: 1..1 replicas" in down.stdout
    wait_until(lambda: ready_count() == 1, 60, what="back to one instance")
    # Kept in the store like the catalog (what a controller started without
    # --catalog serves).
    with contextlib.closing(sqlite3.connect(controller.state_dir / "kscope.db")) as db:
        (raw,) = db.execute("SELECT spec_json FROM models WHERE name = 'echo'").fetchone()
    assert (json.loads(raw)["min_replicas"], json.loads(raw)["max_replicas"]) == (1, 1)
    assert kscope(controller, "scale", "nope", "--max", "2").returncode == 1
