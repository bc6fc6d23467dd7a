"""Agents never outlive their purpose: `kscope serve` takes its agents with it
even when killed with SIGKILL, and an agent whose controller stays away past
KSCOPE_AGENT_ORPHAN_TIMEOUT_S drains and exits (a restart within it is fine)."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import openai

from tests.procs import (
    PYTHON,
    Proc,
    process_alive,
    restart_controller,
    start_controller,
    start_upstream,
    stop_instances_left_behind,
    wait_until,
)


def _agents_of(parent: int) -> list[int]:
    """The node agents `parent` started (they carry KSCOPE_INSTANCE_ID)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid == parent and b"KSCOPE_INSTANCE_ID=" in environ:
            found.append(int(entry.name))
    return found


def test_kill_9_of_kscope_serve_leaves_no_agent_behind(tmp_path: Path) -> None:
    upstream = start_upstream(tmp_path)
    serve = Proc(
        [PYTHON, "-m", "kscope_cli.main", "serve", "--engine", "openai",
         "--upstream-url", upstream.url, "--model", "echo", "--port", "0",
         "--controller-port", "0", "--state-dir", str(tmp_path / "s"),
         # Agents as processes, which could outlive it (in-process ones cannot).
         "--agent-processes"],
        tmp_path / "serve.log",
    )  # fmt: skip
    try:
        wait_until(lambda: "KScope is up" in serve.log(), 30, what="serve announced itself")
        match = re.search(r"KScope is up: (http://127\.0\.0\.1:\d+)/v1", serve.log())
        assert match, serve.log()
        client = openai.OpenAI(base_url=f"{match.group(1)}/v1", api_key="-", max_retries=10)
        assert client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        ).choices
        agents = _agents_of(serve.pid)
        assert agents, "kscope serve started no agent"
        os.kill(serve.pid, signal.SIGKILL)  # the process alone: its agents are in their own groups
        serve.popen.wait(10)
        wait_until(lambda: not any(process_alive(p) for p in agents), 5, 0.1,
                   what="the agents of a SIGKILLed kscope serve exited")  # fmt: skip
    finally:
        serve.stop()
        upstream.proc.stop()
        stop_instances_left_behind(tmp_path / "s")


CATALOG = """
[[models]]
name = "echo"
engine = "openai"
upstream_url = "{url}"
min_replicas = 1
expected_startup_s = 3
"""


def test_an_orphaned_agent_exits_and_one_whose_controller_returns_stays(tmp_path: Path) -> None:
    upstream = start_upstream(tmp_path)
    env = {"KSCOPE_AGENT_ORPHAN_TIMEOUT_S": "5"}  # the local launcher passes it on
    controller = start_controller(tmp_path, CATALOG.format(url=upstream.url), env=env)
    try:
        wait_until(lambda: bool(controller.list_agents()), 20, what="agent registered")
        first = controller.list_agents()[0].pid

        # Back within the timeout: the same agent re-attaches and stays.
        controller.proc.kill()
        time.sleep(1.5)
        controller = restart_controller(controller, tmp_path)
        wait_until(lambda: [a.pid for a in controller.list_agents()] == [first], 15,
                   what="the agent re-attached")  # fmt: skip
        time.sleep(6)
        assert process_alive(first)

        # Gone for longer: the agent drains and exits on its own.
        controller.proc.kill()
        killed = time.monotonic()
        wait_until(lambda: not process_alive(first), 15, 0.2, what="the orphaned agent exited")
        assert time.monotonic() - killed > 4  # not before the timeout
    finally:
        controller.proc.stop()
        upstream.proc.stop()
        stop_instances_left_behind(controller.state_dir)
