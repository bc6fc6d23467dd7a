"""The local launcher's agents that run in this process (`kscope serve`).

An agent for an engine that is an HTTP server of its own (vllm, openai) runs
as a task of the process that also hosts the facade, which then calls it
without gRPC (node_agent/in_process.py). It is stopped as a process would be:
asked to drain, cancelled after the grace period, its engine stopped either
way. It cannot outlive this process, and its engine is tied to it as well
(vLLM runs under `setpriv --pdeathsig`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from pydantic import ValidationError

from controller.launchers.base import AgentInvocation, LauncherObservation, LaunchError
from controller.lifecycle import LauncherPhase

if TYPE_CHECKING:
    from node_agent.in_process import InProcessAgent

log = logging.getLogger(__name__)

REF_PREFIX = "in-process:"
"""How a launcher reference names an agent of this process (never a pid)."""


def is_in_process(ref: str) -> bool:
    return ref.startswith(REF_PREFIX)


class InProcessAgents:
    def __init__(self, stop_grace_s: float):
        self._stop_grace_s = stop_grace_s
        self._agents: dict[str, InProcessAgent] = {}

    def launch(self, instance_id: str, invocation: AgentInvocation) -> str | None:
        """Start the agent in this process and return its reference; None when
        it must be a process of its own (an MLX engine, an engine environment)."""
        from node_agent.engines.factory import UnknownEngine
        from node_agent.in_process import InProcessAgent, NotInProcess, settings_for

        try:
            settings = settings_for(invocation.flags, invocation.env)
        except NotInProcess as why:
            log.info("instance %s runs as a process: %s", instance_id, why)
            return None
        except (ValidationError, ValueError, SystemExit) as exc:  # argparse exits on a bad flag
            raise LaunchError(f"bad agent settings for {instance_id}: {exc}") from exc
        try:
            agent = InProcessAgent(settings)
        except (UnknownEngine, ValueError, OSError) as exc:
            raise LaunchError(f"cannot start the agent of {instance_id}: {exc}") from exc
        ref = REF_PREFIX + instance_id
        self._agents[ref] = agent
        log.info("launched instance %s in this process", instance_id)
        return ref

    def observe(self, ref: str) -> LauncherObservation:
        agent = self._agents.get(ref)
        if agent is None:  # a reference from before this process started
            return LauncherObservation(LauncherPhase.ENDED, "agent process is gone")
        ended = agent.ended()
        if ended is None:
            return LauncherObservation(LauncherPhase.RUNNING)
        del self._agents[ref]  # told once; nothing of it is left to hold
        return LauncherObservation(LauncherPhase.ENDED, ended)

    async def stop(self, ref: str) -> None:
        agent = self._agents.get(ref)
        if agent is not None:
            # RUNNING while it drains, as a process is until its group exits.
            await agent.stop(self._stop_grace_s)
            self._agents.pop(ref, None)

    async def close(self) -> None:
        """Stop them all: none can outlive this process."""
        await asyncio.gather(*(self.stop(ref) for ref in list(self._agents)))
