"""The executor: carries out the reconciler's decisions through the launchers."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from controller.enrollment import EnrollmentRegistry
from controller.fleet import Fleet
from controller.launchers.base import Launcher, LaunchError, LaunchSpec
from controller.reconciler import Decision, Drain, Launch, Stop

log = logging.getLogger(__name__)


RECENT = 500


@dataclass(frozen=True)
class DecisionRecord:
    time_unix_seconds: float
    action: str
    model: str
    instance_id: str
    reason: str


class Executor:
    """Applies decisions; launches and stops run as background tasks so one slow
    launcher never holds up the control loop."""

    def __init__(
        self,
        fleet: Fleet,
        launchers: Mapping[str, Launcher],
        controller_address: str,
        enrollment: EnrollmentRegistry | None,
        ca_pem: bytes | None,
    ):
        """`enrollment` and `ca_pem` are None in plaintext mode."""
        self._fleet = fleet
        self._launchers = launchers
        self._controller_address = controller_address
        self._enrollment = enrollment
        self._ca_pem = ca_pem
        self.decisions: dict[tuple[str, ...], int] = {}
        """(model, launch|drain|stop): decisions carried out, for /metrics."""
        self.recent: collections.deque[DecisionRecord] = collections.deque(maxlen=RECENT)
        """The last RECENT decisions, for ControlService.ListDecisions."""
        self._tasks: set[asyncio.Task[None]] = set()

    async def execute(self, decisions: Sequence[Decision]) -> None:
        for decision in decisions:
            log.info("decision: %s", decision)
            self._count(decision)
            if isinstance(decision, Launch):
                await self._launch(decision)
            elif isinstance(decision, Drain):
                await self._fleet.request_stop(decision.instance_id)
            elif isinstance(decision, Stop):
                await self._stop(decision)

    def _count(self, decision: Decision) -> None:
        if isinstance(decision, Launch):
            model = decision.model
        else:
            inst = self._fleet.instances.get(decision.instance_id)
            model = inst.model if inst is not None else ""
        key = (model, type(decision).__name__.lower())
        self.decisions[key] = self.decisions.get(key, 0) + 1
        instance_id = "" if isinstance(decision, Launch) else decision.instance_id
        self.recent.append(DecisionRecord(time.time(), key[1], model, instance_id, decision.reason))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _launch(self, decision: Launch) -> None:
        spec = self._fleet.catalog.get(decision.model)
        if spec is None:
            return
        inst = await self._fleet.create_instance(spec)
        launcher = self._launchers.get(spec.launcher)
        if launcher is None:
            error = f"no launcher named {spec.launcher!r} is configured"
            await self._fleet.record_launch_error(inst.id, error)
            return
        token = await self._enrollment.mint_for_instance(inst.id) if self._enrollment else ""
        launch_spec = LaunchSpec(
            inst.id, spec, self._controller_address, token,
            self._ca_pem.decode() if self._ca_pem else "",
        )  # fmt: skip
        try:
            ref = await launcher.launch(launch_spec)
        except LaunchError as exc:
            log.error("launch of instance %s failed: %s", inst.id, exc)
            await self._fleet.record_launch_error(inst.id, str(exc))
        else:
            await self._fleet.record_launch(inst.id, ref)
        self._fleet.wake.set()

    async def _stop(self, decision: Stop) -> None:
        inst = self._fleet.instances.get(decision.instance_id)
        if inst is None or not inst.launcher_ref:
            return
        launcher = self._launchers.get(inst.launcher)
        if launcher is None:
            return
        await self._fleet.mark_stop_sent(inst.id)
        instance_id, ref = inst.id, inst.launcher_ref

        async def stop() -> None:
            try:
                await launcher.stop(ref)
            except Exception as exc:
                if isinstance(exc, LaunchError):  # the launcher's own words suffice
                    log.error("stopping instance %s (%s) failed: %s", instance_id, ref, exc)
                else:
                    log.exception("stopping instance %s (%s) failed", instance_id, ref)
                # The next regular pass tries again; waking the loop now would
                # spin it while the launcher fails fast (an SSH backoff).
                self._fleet.stop_failed(instance_id)
                return
            self._fleet.wake.set()

        self._spawn(stop())

    async def wait_idle(self) -> None:
        """Wait for launches and stops under way (used at shutdown)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
