"""Agents that run inside another KScope process: `kscope serve`'s local agents.

`kscope serve` runs the controller, the facade and (for engines that are HTTP
servers: vllm, openai) its agents in one process. Such an agent is the same
`Agent` as a `kscope-agent` process — it enrolls, registers, serves
InferenceService over mutual TLS, reports load, drains — and it also publishes
its request life (node_agent/local_agents.py), so the facade of the same process calls it directly
instead of over gRPC: one hop fewer on the token path of a single host
(docs/architecture.md, "In-process agents"). A facade elsewhere still reaches
it over gRPC.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence

from node_agent.daemon import Agent
from node_agent.main import COMMAND_LINE
from node_agent.settings import AgentSettings

log = logging.getLogger(__name__)

IN_PROCESS_ENGINES = frozenset({"vllm", "openai"})
"""Engines that are HTTP servers of their own (a subprocess, or a remote
server): their agent does only I/O and can share a process with the facade.
An MLX model computes in its agent's process, so that agent stays a process."""

ENV_PREFIX = "KSCOPE_"


class NotInProcess(Exception):
    """This agent must run as a process of its own (the reason says why)."""


def settings_for(flags: Sequence[str], env: Mapping[str, str]) -> AgentSettings:
    """The settings a `kscope-agent` process started with `flags` and `env` on
    top of this process's environment would have: flags first, then `env`'s
    KSCOPE_* variables, then this process's environment, then defaults.

    NotInProcess when it cannot run here: an engine that computes in its
    agent's process, or an environment meant for the engine (it would have to
    change this whole process's)."""
    foreign = sorted(name for name in env if not name.upper().startswith(ENV_PREFIX))
    if foreign:
        raise NotInProcess(f"the model sets engine environment variables ({', '.join(foreign)})")
    settings = COMMAND_LINE.parse_as_child(flags, env)
    if settings.host_agent or settings.engine not in IN_PROCESS_ENGINES:
        raise NotInProcess(f"engine {settings.engine} runs in its agent's process")
    return settings


class InProcessAgent:
    """One agent run as a task of this process, stopped as its process would be."""

    def __init__(self, settings: AgentSettings):
        self.agent = Agent(settings)
        # run() stops everything it started however it ends, cancelled included.
        self.task = asyncio.create_task(
            self.agent.run(in_process=True), name=f"agent-{settings.instance_id}"
        )

    def ended(self) -> str | None:
        """Why the agent ended; None while it runs."""
        task = self.task
        if not task.done():
            return None
        if task.cancelled():
            return "agent stopped"
        failure = task.exception()
        if failure is not None:
            return f"agent failed: {failure!r}"
        code = task.result()
        return f"agent exited with code {code}" if code else "agent exited"

    async def stop(self, grace_s: float) -> None:
        """Drain and stop, as SIGTERM does a process; cancelled after `grace_s`."""
        self.agent.request_drain("stopped by the controller")
        done, _ = await asyncio.wait({self.task}, timeout=grace_s)
        if not done:
            log.warning("in-process agent %s did not stop in %.0fs; cancelling",
                        self.agent.settings.instance_id, grace_s)  # fmt: skip
            self.task.cancel()
            await asyncio.wait({self.task})
