"""The control loop: observe launchers, derive states, decide, execute; repeat.

Each pass reads the clock once and hands that `now` to every derivation
(controller/fleet_views.py, the load samples): the facts, the reconciler's
views, the launch backoff and the load all describe the same moment.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

from controller.executor import Executor
from controller.fleet import Fleet
from controller.fleet_views import held_back, instance_views
from controller.launchers.base import Launcher
from controller.lifecycle import LauncherPhase
from controller.load_sampling import LoadSamples
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
        clock: Callable[[], float] = time.time,
    ):
        self._fleet = fleet
        self._launchers = launchers
        self._executor = executor
        self._interval_s = interval_s
        self._drain_timeout_s = drain_timeout_s
        self._rotation_lead_s = rotation_lead_s
        self._clock = clock
        self._load = LoadSamples()

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
        now = self._clock()
        fleet = self._fleet
        await fleet.refresh(now)
        instances = list(fleet.instances.values())
        decisions = decide(
            fleet.specs(),
            instance_views(instances, fleet.agents, now),
            fleet.demanded,
            self._drain_timeout_s,
            held_back=held_back(fleet.catalog.models, instances, now),
            rotation_lead_s=self._rotation_lead_s,
            by_load=self._load.scale_by_load(fleet.catalog.models, instances, fleet.agents, now),
        )
        if decisions:
            await self._executor.execute(decisions)
            # Launches are awaited (an sbatch over SSH takes seconds): judge
            # what they changed at the time they finished.
            await fleet.refresh(self._clock())

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
            for inst in list(self._fleet.instances.values()):
                obs = observed.get(inst.launcher_ref)
                if inst.launcher == name and obs is not None:
                    self._fleet.observe_launcher(
                        inst.id, obs.phase, obs.reason, obs.expected_start, obs.ends_at
                    )
