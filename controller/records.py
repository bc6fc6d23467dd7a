"""The controller's records of instances and agents (what the store keeps)."""

from __future__ import annotations

from dataclasses import dataclass, field

from controller.lifecycle import AgentPhase, InstanceState, LauncherPhase
from kscope_common.request_stats import RequestTotals


@dataclass
class InstanceRecord:
    """One instance of a model: facts observed, and the state derived from them."""

    id: str
    model: str
    launcher: str
    seq: int
    """Launch order; larger is newer."""
    created_at: float
    state: InstanceState = InstanceState.REQUESTED
    reason: str = ""
    updated_at: float = 0.0
    launcher_ref: str = ""
    launch_error: str = ""
    stop_requested: bool = False
    stop_requested_at: float = 0.0
    stop_sent: bool = False
    agent_id: str = ""
    agent_address: str = ""
    engine_url: str = ""
    ever_registered: bool = False
    # Observed at run time, not stored:
    launcher_phase: LauncherPhase = LauncherPhase.UNKNOWN
    launcher_reason: str = ""
    launcher_expected_start: float | None = None
    """PENDING: when the scheduler expects the job to start (epoch seconds)."""
    launcher_ends_at: float | None = None
    """RUNNING: when the job's time limit runs out (epoch seconds); None: never."""
    ready_at: float = 0.0
    """When this controller saw it become READY (0: before this controller's time)."""
    agent_lost: bool = False
    agent_lost_reason: str = ""


@dataclass
class AgentRecord:
    """A registered node agent."""

    id: str
    instance_id: str
    address: str
    hostname: str = ""
    models: list[str] = field(default_factory=list)
    engine: str = ""
    engine_url: str = ""
    pid: int = 0
    registered_at: float = 0.0
    last_report_at: float = 0.0
    # From the latest load report, not stored:
    phase: AgentPhase | None = None
    detail: str = ""
    in_flight: int = 0
    queued: int = 0
    queued_by_caller: dict[str, int] = field(default_factory=dict)
    """Of `queued`, per caller (the key's owner)."""
    max_concurrency: int = 0
    """The agent's queue limits (0: no limit)."""
    max_queue_size: int = 0
    connected: bool = False
    totals: RequestTotals = field(default_factory=RequestTotals)
    """The requests that ended since the agent started (from its reports)."""
    last_busy_at: float = 0.0
    """When a report last showed requests in flight, queued or newly served."""
    host_agent: bool = False
    """A host agent: no instance of its own; it loads `models` when asked."""
    memory_bytes: int = 0
    hosted: dict[str, HostedState] = field(default_factory=dict)
    """A host agent's instances, by instance id, from its latest report."""
    identity: str = ""
    """The certificate identity it registered with (not stored: agents register
    again after a controller restart); '' in plaintext mode."""


@dataclass(frozen=True)
class HostedState:
    """One instance a host agent started, as it reports it."""

    running: bool
    detail: str = ""
