"""The local launcher: each instance is a `kscope-agent` process on this machine.

Each agent runs in its own process group (its own session), so stopping an
instance signals the whole group, never a process found by name. The reference
is "pid:starttime" so a recycled pid is never mistaken for our agent after a
controller restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from controller.launchers.base import (
    LauncherObservation,
    LaunchError,
    LaunchSpec,
    agent_invocation,
)
from controller.launchers.in_process import InProcessAgents, is_in_process
from controller.lifecycle import LauncherPhase

log = logging.getLogger(__name__)


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (field 22 of /proc/pid/stat), or
    None when there is no such live process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":  # a zombie has exited
        return None
    return fields[19]


def tied_to_parent(argv: list[str]) -> list[str]:
    """On Linux, `setpriv --pdeathsig TERM` (util-linux): the child is sent
    SIGTERM when its parent dies; macOS has no such thing."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *argv] if setpriv else argv


class LocalLauncher:
    """Starts agents as local processes, one process group each."""

    name = "local"

    def __init__(
        self,
        log_dir: Path,
        python: str = sys.executable,
        stop_grace_s: float = 15.0,
        tie_to_us: bool = False,
        in_process: bool = False,
    ):
        """`tie_to_us`: the kernel stops the agents when this process dies, even
        by SIGKILL (`kscope serve`; a cluster's controller lets them outlive a
        restart instead). `in_process`: agents whose engine allows it run in
        this process (`kscope serve`, controller/launchers/in_process.py)."""
        self._log_dir = log_dir
        self._python = python
        self._tie_to_us = tie_to_us
        self._stop_grace_s = stop_grace_s
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._known: set[str] = set()
        self._in_process = InProcessAgents(stop_grace_s) if in_process else None

    async def launch(self, spec: LaunchSpec) -> str:
        invocation = agent_invocation(spec, self._python)
        if self._in_process is not None:
            ref = self._in_process.launch(spec.instance_id, invocation)
            if ref is not None:
                return ref
        self._log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        log_path = self._log_dir / f"{spec.instance_id}.log"
        env = {**os.environ, **invocation.env}
        try:
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "ab") as log_file:
                proc = subprocess.Popen(
                    tied_to_parent(invocation.argv) if self._tie_to_us else invocation.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
        except OSError as exc:
            raise LaunchError(f"cannot start {invocation.argv[0]}: {exc}") from exc
        ref = f"{proc.pid}:{_start_time(proc.pid) or '0'}"
        self._children[ref] = proc
        self._known.add(ref)
        log.info("launched instance %s as pid %d (log %s)", spec.instance_id, proc.pid, log_path)
        return ref

    def _phase(self, ref: str) -> LauncherObservation:
        if is_in_process(ref):
            if self._in_process is None:
                return LauncherObservation(LauncherPhase.ENDED, "agent process is gone")
            return self._in_process.observe(ref)
        proc = self._children.get(ref)
        if proc is not None:
            code = proc.poll()
            if code is None:
                return LauncherObservation(LauncherPhase.RUNNING)
            return LauncherObservation(LauncherPhase.ENDED, _exit_reason(code))
        pid_text, _, start = ref.partition(":")
        if not pid_text.isdigit() or _start_time(int(pid_text)) != start:
            return LauncherObservation(LauncherPhase.ENDED, "agent process is gone")
        self._known.add(ref)  # adopted after a controller restart
        return LauncherObservation(LauncherPhase.RUNNING)

    async def observe(self, refs: Sequence[str]) -> dict[str, LauncherObservation]:
        return {ref: self._phase(ref) for ref in refs}

    async def stop(self, ref: str) -> None:
        if is_in_process(ref):
            if self._in_process is not None:
                await self._in_process.stop(ref)
            return
        pid_text, _, _ = ref.partition(":")
        if not pid_text.isdigit() or self._phase(ref).phase is LauncherPhase.ENDED:
            return
        pgid = int(pid_text)
        log.info("stopping process group %d", pgid)
        _signal_group(pgid, signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._stop_grace_s
        while loop.time() < deadline:
            if self._phase(ref).phase is LauncherPhase.ENDED and not _group_alive(pgid):
                return
            await asyncio.sleep(0.1)
        log.warning("process group %d ignored SIGTERM for %.0fs; killing", pgid, self._stop_grace_s)
        _signal_group(pgid, signal.SIGKILL)
        self._phase(ref)

    async def close(self, stop_instances: bool) -> None:
        if self._in_process is not None:
            await self._in_process.close()
        if stop_instances:
            await asyncio.gather(*(self.stop(ref) for ref in list(self._known)))


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _exit_reason(code: int) -> str:
    if code < 0:
        return f"agent killed by signal {signal.Signals(-code).name}"
    return f"agent exited with code {code}"
