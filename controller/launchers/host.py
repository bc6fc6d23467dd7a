"""The host launcher: instances on host agents (a Mac under launchd, a
workstation) that offer models from their own disk.

A host agent registers without an instance and lists the models it can load.
Launching an instance sends a LoadModelCommand over that agent's Session; the
host agent starts the instance's own agent process, which registers like any
other. The reference is "<host agent id>/<instance id>"; what the host agent
reports about its instances is what this launcher observes. Stopping sends an
UnloadModelCommand.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from controller.fleet import Fleet, LoadModelCommand, UnloadModelCommand
from controller.launchers.base import LauncherObservation, LaunchError, LaunchSpec
from controller.lifecycle import LauncherPhase
from controller.records import AgentRecord

log = logging.getLogger(__name__)

REPORT_GRACE_S = 15.0
"""How long a launched instance may be missing from its host agent's reports
(the command is in flight, or the host agent reconnects) before it counts as gone."""


class HostLauncher:
    """Places instances on connected host agents that offer the model."""

    name = "host"

    def __init__(self, fleet: Fleet, report_grace_s: float = REPORT_GRACE_S):
        self._fleet = fleet
        self._grace_s = report_grace_s
        self._started = time.monotonic()
        self._launched_at: dict[str, float] = {}

    def _hosts_offering(self, model: str) -> list[AgentRecord]:
        return [
            a
            for a in self._fleet.agents.values()
            if a.host_agent and a.connected and model in a.models
        ]

    async def launch(self, spec: LaunchSpec) -> str:
        model = spec.model.name
        hosts = self._hosts_offering(model)
        if not hosts:
            raise LaunchError(f"no connected host agent offers model {model!r}")
        # The host running the fewest instances, then the one with the most memory.
        host = min(hosts, key=lambda a: (sum(h.running for h in a.hosted.values()),
                                         -a.memory_bytes))  # fmt: skip
        self._fleet.send(host.id, LoadModelCommand(spec.instance_id, spec.model, spec.enroll_token))
        ref = f"{host.id}/{spec.instance_id}"
        self._launched_at[ref] = time.monotonic()
        log.info("asked host agent %s (%s) to load %s as %s", host.id, host.hostname, model,
                 spec.instance_id)  # fmt: skip
        return ref

    def _observe(self, ref: str) -> LauncherObservation:
        host_id, _, instance_id = ref.partition("/")
        host = self._fleet.agents.get(host_id)
        hosted = host.hosted.get(instance_id) if host is not None and host.connected else None
        if hosted is not None:
            if hosted.running:
                return LauncherObservation(LauncherPhase.RUNNING)
            return LauncherObservation(LauncherPhase.ENDED, hosted.detail or "unloaded")
        since = self._launched_at.get(ref, self._started)
        if time.monotonic() - since < self._grace_s:
            return LauncherObservation(LauncherPhase.UNKNOWN)
        if host is None or not host.connected:
            return LauncherObservation(LauncherPhase.ENDED, f"host agent {host_id} is gone")
        return LauncherObservation(LauncherPhase.ENDED, f"host agent {host_id} does not run it")

    async def observe(self, refs: Sequence[str]) -> dict[str, LauncherObservation]:
        return {ref: self._observe(ref) for ref in refs}

    async def stop(self, ref: str) -> None:
        host_id, _, instance_id = ref.partition("/")
        self._fleet.send(host_id, UnloadModelCommand(instance_id))

    async def close(self, stop_instances: bool) -> None:
        if stop_instances:
            for ref in list(self._launched_at):
                await self.stop(ref)
