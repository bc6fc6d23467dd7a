"""An instance's state, derived from observed facts by one pure function.

Nothing sets an instance's state directly: launchers and agents report facts,
and `derive_state` says what those facts mean. Terminal states are sticky.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class InstanceState(StrEnum):
    """Where an instance is in its life. Only READY is routable."""

    REQUESTED = "requested"
    """The controller decided to launch it; nothing was submitted yet."""
    SUBMITTED = "submitted"
    """Handed to the launcher; the launcher has not said more yet."""
    PENDING = "pending"
    """The launcher holds it back (a SLURM job waiting for resources)."""
    STARTING = "starting"
    """Running; its agent has not registered or its engine is loading."""
    READY = "ready"
    """The agent's engine is healthy: routable."""
    DRAINING = "draining"
    """Finishing in-flight requests before it stops; not routable."""
    STOPPED = "stopped"
    """Gone, because the controller asked."""
    FAILED = "failed"
    """Gone or unusable without the controller asking; the reason says why."""

    @property
    def ended(self) -> bool:
        return self in (InstanceState.STOPPED, InstanceState.FAILED)


class LauncherPhase(StrEnum):
    """What a launcher observes about the process or job behind an instance."""

    UNKNOWN = "unknown"
    """Submitted, but not observed yet."""
    PENDING = "pending"
    """Queued (SLURM PENDING); not running yet."""
    RUNNING = "running"
    """The process or job runs."""
    ENDED = "ended"
    """The process exited or the job left the queue."""


class AgentPhase(StrEnum):
    """What an agent says about itself in its load reports."""

    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


@dataclass(frozen=True)
class InstanceFacts:
    """Everything observed about one instance, at one moment."""

    previous: InstanceState
    """The state derived last time; terminal states never change."""
    submitted: bool = False
    """The launcher accepted the launch (there is a launcher reference)."""
    launch_error: str = ""
    """The launcher refused the launch, and why."""
    launcher_phase: LauncherPhase = LauncherPhase.UNKNOWN
    launcher_reason: str = ""
    """Pending reason, or why the process or job ended."""
    stop_requested: bool = False
    """The controller asked this instance to drain and stop."""
    agent_connected: bool = False
    """The agent's Session stream is open now."""
    agent_phase: AgentPhase | None = None
    """The agent's last reported phase (None before its first report)."""
    agent_detail: str = ""
    agent_lost: bool = False
    """The agent's Session stream broke while this controller watched it."""
    agent_lost_reason: str = ""
    awaiting_reconnect: bool = False
    """The controller restarted, the agent was attached before, and the grace
    period for it to come back has not run out."""
    reconnect_expired: bool = False
    """As above, but the grace period ran out without the agent."""
    age_s: float = 0.0
    """Seconds since launch."""
    startup_timeout_s: float = 900.0


def derive_state(f: InstanceFacts) -> tuple[InstanceState, str]:
    """The instance's state and the reason for it, from the facts alone."""
    if f.previous.ended:
        return f.previous, ""
    if f.launch_error:
        return InstanceState.FAILED, f"launch failed: {f.launch_error}"
    if f.launcher_phase == LauncherPhase.ENDED:
        if f.stop_requested:
            return InstanceState.STOPPED, "stopped on request"
        return InstanceState.FAILED, f.launcher_reason or "process ended unexpectedly"
    if f.stop_requested and not f.submitted:
        return InstanceState.STOPPED, "stopped before it was launched"
    if f.agent_lost and not f.stop_requested:
        return InstanceState.FAILED, f.agent_lost_reason or "agent lost: its session ended"
    if f.reconnect_expired and not f.stop_requested:
        return InstanceState.FAILED, "agent did not reconnect after a controller restart"
    if f.awaiting_reconnect:
        return f.previous, "waiting for the agent to reconnect"
    if f.stop_requested:
        return InstanceState.DRAINING, "draining before stop"
    if f.agent_connected and f.agent_phase == AgentPhase.FAILED:
        return InstanceState.FAILED, f"engine failed: {f.agent_detail or 'no detail'}"
    if f.agent_connected and f.agent_phase == AgentPhase.READY:
        return InstanceState.READY, "engine healthy"
    if f.agent_connected and f.agent_phase == AgentPhase.DRAINING:
        return InstanceState.DRAINING, "agent draining"
    if not f.submitted:
        return InstanceState.REQUESTED, "waiting to be launched"
    if f.age_s > f.startup_timeout_s:
        return InstanceState.FAILED, f"not ready within {f.startup_timeout_s:.0f}s of launch"
    if f.agent_connected:
        return InstanceState.STARTING, f.agent_detail or "engine starting"
    if f.launcher_phase == LauncherPhase.PENDING:
        return InstanceState.PENDING, f.launcher_reason or "queued"
    if f.launcher_phase == LauncherPhase.RUNNING:
        return InstanceState.STARTING, "waiting for the agent to register"
    return InstanceState.SUBMITTED, "submitted to the launcher"
