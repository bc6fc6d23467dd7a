"""The launcher interface, and the agent command every launcher runs."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from controller.catalog import ModelSpec
from controller.lifecycle import LauncherPhase
from kscope_common.cli import AgentCommand, agent_argv, agent_flags


class LaunchError(RuntimeError):
    """The launcher could not start an instance (permanent for that attempt)."""


@dataclass(frozen=True)
class LaunchSpec:
    """What a launcher needs to start one instance."""

    instance_id: str
    model: ModelSpec
    controller_address: str
    """host:port of the controller's public port, where the agent enrolls."""
    enroll_token: str
    """One-time, bound to this instance; '' in plaintext mode."""
    ca_pem: str = ""
    """The cluster CA the agent checks the controller against (public)."""


@dataclass(frozen=True)
class LauncherObservation:
    """What a launcher sees of one instance's process or job."""

    phase: LauncherPhase
    reason: str = ""
    expected_start: float | None = None
    """PENDING: when the scheduler expects it to start (epoch seconds, this clock)."""
    ends_at: float | None = None
    """RUNNING: when its time limit runs out (epoch seconds, this clock); None: never."""


@dataclass(frozen=True)
class AgentInvocation:
    """How to start a node agent: argv is public, env may hold secrets."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    """argv's flags alone (what an agent run in this process parses)."""


class Launcher(Protocol):
    """Starts, observes and stops instances. Implementations: local, slurm."""

    name: str

    async def launch(self, spec: LaunchSpec) -> str:
        """Start an instance; return the launcher's reference to it (pgid, job id)."""
        ...

    async def observe(self, refs: Sequence[str]) -> dict[str, LauncherObservation]:
        """Observe many instances at once; refs it does not know are ENDED."""
        ...

    async def stop(self, ref: str) -> None:
        """Stop an instance's process or job, forcefully if it will not go."""
        ...

    async def close(self, stop_instances: bool) -> None:
        """Release connections; with stop_instances, stop every instance too."""
        ...


def agent_invocation(spec: LaunchSpec, python: str = sys.executable) -> AgentInvocation:
    """The `kscope-agent` command for an instance. Secrets travel in env only,
    never on the command line, where `ps` shows them."""
    model = spec.model
    command = AgentCommand(
        engine=model.engine.value,
        model=model.name,
        model_path=model.model_path,
        upstream_url=model.upstream_url,
        upstream_model=model.upstream_model,
        upstream_ca_bundle=model.upstream_ca_bundle,
        upstream_insecure_skip_verify=model.upstream_insecure_skip_verify,
        engine_args=model.engine_args,
        max_concurrency=model.max_concurrency,
        queue_size=model.queue_size,
        queue_timeout_s=model.queue_timeout_s,
        aliases=model.aliases,
        lora_modules=tuple(f"{m.name}={m.path}" for m in model.lora_modules),
    )
    env = {
        "KSCOPE_CONTROLLER": spec.controller_address,
        "KSCOPE_INSTANCE_ID": spec.instance_id,
        **model.env,
    }
    if spec.enroll_token:
        env["KSCOPE_ENROLL_TOKEN"] = spec.enroll_token
        env["KSCOPE_TLS_CA"] = spec.ca_pem
    else:
        env["KSCOPE_INSECURE_PLAINTEXT"] = "1"
    return AgentInvocation(agent_argv(command, python), env, agent_flags(command))
