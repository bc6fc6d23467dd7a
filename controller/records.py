"""The controller's records of instances and agents (what the store keeps)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from controller.lifecycle import AgentPhase, InstanceState, LauncherPhase
from kscope_common.capabilities import Capabilities
from kscope_common.request_stats import RequestTotals


def _any_of(values: Sequence[bool | None]) -> bool | None:
    """Someone can (True), nobody known can't… (None), or nobody can (False)."""
    if any(v is True for v in values):
        return True
    return None if any(v is None for v in values) else False


def union_of(capabilities: Sequence[Capabilities]) -> Capabilities | None:
    """What a model with these instances can do: whatever one of them can (the
    facade then picks an instance that can). A field one of them does not know
    is not known for the model."""
    if not capabilities:
        return None
    first = capabilities[0]

    def known_union(sets: Sequence[frozenset[str]]) -> frozenset[str]:
        return frozenset() if any(not s for s in sets) else frozenset().union(*sets)

    def known_max(values: Sequence[int]) -> int:
        return 0 if any(v <= 0 for v in values) else max(values)

    return Capabilities(
        endpoints=known_union([c.endpoints for c in capabilities]),
        input_modalities=known_union([c.input_modalities for c in capabilities]),
        tools=_any_of([c.tools for c in capabilities]),
        structured_output=_any_of([c.structured_output for c in capabilities]),
        max_model_len=known_max([c.max_model_len for c in capabilities]),
        max_chars_per_token=known_max([c.max_chars_per_token for c in capabilities]),
        lora_adapters=tuple(sorted({a for c in capabilities for a in c.lora_adapters})),
        engine=first.engine,
        engine_version=first.engine_version,
        runner=first.runner,
    )


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
    capabilities: Capabilities | None = None
    """What its instance can do, as it last said (not stored: agents say it
    again when they register after a controller restart); None: not yet known."""


@dataclass(frozen=True)
class HostedState:
    """One instance a host agent started, as it reports it."""

    running: bool
    detail: str = ""
