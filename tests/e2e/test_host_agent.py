"""Host agents (how Macs join the fleet), with real MLX-VLM: a host agent offers
a model from its disk, the controller has it loaded when a request arrives and
unloaded after the model's idle timeout; and the launchd plist that
`kscope-agent install-launchd` writes runs such an agent.

launchd itself does not exist here: the plist is checked with plistlib and its
ProgramArguments are run directly, as launchd would run them.
"""

from __future__ import annotations

import os
import plistlib
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from kscope.v1 import control_pb2
from tests.procs import (
    PYTHON,
    Controller,
    Facade,
    Proc,
    Samples,
    process_alive,
    scrape_metrics,
    start_controller,
    start_facade,
    stop_instances_left_behind,
    wait_until,
)
from tests.slurm_cluster import descendants

pytestmark = pytest.mark.mlx

MODEL = "mac-vlm"
IDLE_S = 4
AGENT = str(Path(sys.executable).parent / "kscope-agent")


class Fleet:
    def __init__(self, tmp: Path, controller: Controller, facade: Facade, tiny_vlm: Path):
        self.tmp = tmp
        self.controller = controller
        self.facade = facade
        self.tiny_vlm = tiny_vlm

    def token_file(self, host: str) -> Path:
        """A private file holding a fresh enrollment token for `host` (as an
        operator makes with `kscope hosts add HOST`)."""
        path = self.tmp / f"{host}.token"
        path.write_text(self.controller.enrollment_token("host", host) + "\n")
        path.chmod(0o600)
        return path

    def host_agents(self) -> list[control_pb2.Agent]:
        return [a for a in self.controller.list_agents() if a.host_agent]

    def state(self) -> Any:
        reply = httpx.get(f"{self.facade.base_url}/v1/models", timeout=5)
        return {m["id"]: m["state"] for m in reply.json()["data"]}[MODEL]

    def instances(self) -> list[control_pb2.Instance]:
        return self.controller.list_instances(model=MODEL, include_ended=True)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, tiny_vlm: Path) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("hosts")
    catalog = f"""
[[models]]
name = "{MODEL}"
engine = "mlx_vlm"
launcher = "host"
idle_timeout_s = {IDLE_S}
expected_startup_s = 5
"""
    controller = start_controller(tmp, catalog)
    facade = start_facade(tmp, controller)
    try:
        yield Fleet(tmp, controller, facade, tiny_vlm)
    finally:
        facade.proc.stop()
        controller.proc.stop()
        stop_instances_left_behind(controller.state_dir)


def _host_agent(fleet: Fleet, name: str) -> Proc:
    return Proc(
        [PYTHON, "-m", "node_agent.main", "--host-agent", "--controller", fleet.controller.address,
         "--token-file", str(fleet.token_file(name)), "--ca", str(fleet.controller.ca_path),
         "--models", f"{MODEL}={fleet.tiny_vlm}"],
        fleet.tmp / "logs" / f"{name}.log",
        env={"KSCOPE_HOST_STATE_DIR": str(fleet.tmp / name), "KSCOPE_AGENT_METRICS_PORT": "0",
             "KSCOPE_AGENT_METRICS_PORT_FILE": str(fleet.tmp / f"{name}.metrics-port")},
    )  # fmt: skip


def _host_metrics(fleet: Fleet, name: str) -> Samples:
    port = int((fleet.tmp / f"{name}.metrics-port").read_text())
    return scrape_metrics(f"http://127.0.0.1:{port}/metrics")


def _ask(fleet: Fleet) -> str:
    client = openai.OpenAI(base_url=f"{fleet.facade.base_url}/v1", api_key="-", max_retries=0)
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=8
    )
    text: str = reply.choices[0].message.content or ""
    return text


def test_host_agent_loads_on_demand_and_unloads_when_idle(fleet: Fleet) -> None:
    host = _host_agent(fleet, "host-agent")
    try:
        wait_until(lambda: len(fleet.host_agents()) == 1, 20, what="host agent registered")
        (agent,) = fleet.host_agents()
        assert list(agent.models) == [MODEL] and agent.memory_bytes > 0
        assert fleet.state() == "cold" and not fleet.instances()

        for cycle in range(2):  # loaded, unloaded, and loaded again on the next request
            cold = httpx.post(
                f"{fleet.facade.base_url}/v1/chat/completions", timeout=10,
                json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
            )  # fmt: skip
            assert cold.status_code == 503
            wait_until(lambda: fleet.state() == "ready", 60, 0.2, what="model loaded")
            assert _ask(fleet)
            (live,) = [i for i in fleet.instances() if i.state == control_pb2.INSTANCE_STATE_READY]
            assert live.launcher == "host" and live.launcher_ref == f"{agent.id}/{live.id}"
            (agent,) = fleet.host_agents()
            assert list(agent.hosted_instances) == [live.id]
            # One scrape target per host: its instances, and each instance agent's figures.
            scraped = _host_metrics(fleet, "host-agent")
            assert scraped[("kscope_host_instances", (("model", MODEL), ("running", "true")))] == 1
            ok = (("instance_id", live.id), ("model", MODEL), ("status", "200"))
            assert scraped[("kscope_agent_requests_total", ok)] >= 1

            # Busy for longer than the idle timeout: it stays loaded while used.
            until = time.monotonic() + IDLE_S + 1
            while time.monotonic() < until:
                _ask(fleet)
                time.sleep(0.5)
            assert fleet.state() == "ready"

            idle_from = time.monotonic()
            wait_until(
                lambda i=live.id: any(
                    x.id == i and x.state == control_pb2.INSTANCE_STATE_STOPPED
                    for x in fleet.instances()
                ),
                IDLE_S + 20, 0.2, what=f"cycle {cycle}: unloaded after the idle timeout",
            )  # fmt: skip
            assert time.monotonic() - idle_from >= IDLE_S - 1
            wait_until(lambda: not fleet.host_agents()[0].hosted_instances, 10,
                       what="the host agent's instance process ended")  # fmt: skip
            assert fleet.state() == "cold"
            assert fleet.host_agents()[0].id == agent.id  # the host agent stays
        # A clean stop, as launchd's SIGTERM to the agent: it exits 0 and leaves
        # no process behind (neither its own children nor its process group).
        started = [host.pid, *descendants(host.pid)]
        os.kill(host.pid, signal.SIGTERM)
        exit_code = host.popen.wait(30)
        left = [pid for pid in started + _group(host.pid) if process_alive(pid)]
    finally:
        host.stop()
    assert exit_code == 0, host.log()[-3000:]
    assert left == []


def _group(pgid: int) -> list[int]:
    """The processes of process group `pgid`."""
    members = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        if stat and int(stat[stat.rindex(")") + 2 :].split()[2]) == pgid:
            members.append(int(entry.name))
    return members


def _install(fleet: Fleet, plist: Path, token_file: Path, extra_env: dict[str, str]) -> Any:
    return subprocess.run(
        [AGENT, "install-launchd", "--path", str(plist), "--controller", fleet.controller.address,
         "--token-file", str(token_file), "--models", f"{MODEL}={fleet.tiny_vlm}",
         "--ca", str(fleet.controller.ca_path),
         "--log-dir", str(fleet.tmp / "launchd-logs"),
         "--working-dir", str(fleet.tmp / "launchd-work")],
        capture_output=True, text=True, timeout=60, env={**os.environ, **extra_env},
    )  # fmt: skip


def test_launchd_plist_starts_a_host_agent_that_registers(fleet: Fleet, tmp_path: Path) -> None:
    token = fleet.controller.enrollment_token("host", "mac-launchd")
    plist_path = tmp_path / "LaunchAgents" / "org.kscope.agent.plist"
    token_file = tmp_path / "token"

    # The token comes from the environment once, into a file only its owner reads.
    done = _install(fleet, plist_path, token_file, {"KSCOPE_ENROLL_TOKEN": token})
    assert done.returncode == 0, done.stderr
    assert f"launchctl bootstrap gui/{os.getuid()} {plist_path}" in done.stdout
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    raw = plist_path.read_bytes()
    assert token.encode() not in raw

    plist = plistlib.loads(raw)
    assert plist["Label"] == "org.kscope.agent"
    assert plist["RunAtLoad"] is True and plist["KeepAlive"] is True
    args: list[str] = plist["ProgramArguments"]
    assert Path(args[0]).resolve() == Path(AGENT).resolve() and os.access(args[0], os.X_OK)
    assert args[1] == "--host-agent" and str(token_file) in args
    assert Path(plist["StandardOutPath"]).parent == fleet.tmp / "launchd-logs"
    assert Path(plist["WorkingDirectory"]).is_dir()
    assert "PATH" in plist["EnvironmentVariables"]
    # The CA is public: the plist names its file; the token stays in the private file.
    assert plist["EnvironmentVariables"]["KSCOPE_TLS_CA"] == str(fleet.controller.ca_path)

    before = {a.id for a in fleet.host_agents()}
    agent = Proc(args, tmp_path / "launchd-agent.log", env=plist["EnvironmentVariables"])
    try:
        wait_until(lambda: {a.id for a in fleet.host_agents()} - before, 20,
                   what="the plist's agent registered")  # fmt: skip
        (new,) = [a for a in fleet.host_agents() if a.id not in before]
        assert new.pid == agent.pid and list(new.models) == [MODEL]
    finally:
        agent.stop()

    gone = subprocess.run([AGENT, "uninstall-launchd", "--path", str(plist_path)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert gone.returncode == 0 and not plist_path.exists()
    assert re.search(rf"launchctl bootout gui/{os.getuid()}/org.kscope.agent", gone.stdout)

    # A token file others can read is refused.
    token_file.chmod(0o644)
    refused = _install(fleet, plist_path, token_file, {})
    assert refused.returncode == 2 and "chmod 600" in refused.stderr
    assert not plist_path.exists()


def test_revoking_a_host_stops_its_traffic(fleet: Fleet) -> None:
    """`kscope hosts revoke NAME`: the host agent's Session is closed and it is
    refused when it comes back, so it leaves, unloading its instances; the
    model is no longer served from that Mac."""
    host = _host_agent(fleet, "revoked-mac")
    try:
        wait_until(lambda: len(fleet.host_agents()) == 1, 20, what="host agent registered")
        hello = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        httpx.post(f"{fleet.facade.base_url}/v1/chat/completions", json=hello, timeout=10)
        wait_until(lambda: fleet.state() == "ready", 60, 0.2, what="model loaded")
        assert _ask(fleet)
        (live,) = [i for i in fleet.instances() if i.state == control_pb2.INSTANCE_STATE_READY]

        fleet.controller.revoke("host", "revoked-mac")
        assert host.popen.wait(30) == 3  # refused for good: it does not retry
        wait_until(lambda: not fleet.host_agents(), 15, what="the host agent is gone")
        wait_until(
            lambda: all(i.state != control_pb2.INSTANCE_STATE_READY for i in fleet.instances()
                        if i.id == live.id),
            30, 0.2, what="its instance no longer serves",
        )  # fmt: skip
        refused = httpx.post(f"{fleet.facade.base_url}/v1/chat/completions", json=hello, timeout=10)
        assert refused.status_code == 503  # nobody serves it now
    finally:
        host.stop()
