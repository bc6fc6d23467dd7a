"""The control loop: observe launchers, derive states, decide, execute; repeat."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from controller.executor import Executor
from controller.fleet import Fleet
from controller.launchers.base import Launcher
from controller.lifecycle import LauncherPhase
from controller.reconciler import decide

log = logging.getLogger(__name__)


class ControlLoop:
    """Runs one reconcile pass every `interval_s`, or sooner when woken."""

    def __init__(
        self,
        fleet: Fleet,
        launchers: Mapping[str, Launcher],
        executor: Executor,
        interval_s: float = 1.0,
        drain_timeout_s: float = 300.0,
        rotation_lead_s: float = 0.0,
    ):
        self._fleet = fleet
        self._launchers = launchers
        self._executor = executor
        self._interval_s = interval_s
        self._drain_timeout_s = drain_timeout_s
        self._rotation_lead_s = rotation_lead_s

    async def run(self) -> None:
        while True:
            try:
                await self.reconcile_once()
            except Exception:
                # One bad pass must not stop the control plane; the next pass retries.
                log.exception("reconcile pass failed")
            try:
                await asyncio.wait_for(self._fleet.wake.wait(), self._interval_s)
            except TimeoutError:
                pass
            self._fleet.wake.clear()

    async def reconcile_once(self) -> None:
        await self._observe()
        await self._fleet.refresh()
        decisions = decide(
            self._fleet.specs(),
            self._fleet.views(),
            self._fleet.demanded,
            self._drain_timeout_s,
            held_back=self._fleet.held_back(),
            rotation_lead_s=self._rotation_lead_s,
            by_load=self._fleet.scale_by_load(time.time()),
        )
        if decisions:
            await self._executor.execute(decisions)
            await self._fleet.refresh()

    async def _observe(self) -> None:
        by_launcher: dict[str, list[str]] = {}
        for inst in self._fleet.instances.values():
            if inst.launcher_ref and inst.launcher_phase is not LauncherPhase.ENDED:
                by_launcher.setdefault(inst.launcher, []).append(inst.launcher_ref)
        for name, refs in by_launcher.items():
            launcher = self._launchers.get(name)
            if launcher is None:
                continue
            observed = await launcher.observe(refs)
            for inst in self._fleet.instances.values():
                obs = observed.get(inst.launcher_ref)
                if inst.launcher == name and obs is not None:
                    self._fleet.observe_launcher(
                        inst, obs.phase, obs.reason, obs.expected_start, obs.ends_at
                    )
