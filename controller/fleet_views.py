"""What the fleet's records mean at one moment: pure functions of records and `now`.

The fleet (controller/fleet.py) keeps the records and changes them; these
functions only read them. Each takes the time it should judge by, so one
reconcile pass (controller/control_loop.py) reads the clock once and every
derivation of that pass agrees: the lifecycle's facts, the reconciler's views,
the models held back after failures and the models idle past their timeout.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence

from controller.catalog import ModelSpec
from controller.lifecycle import InstanceFacts, InstanceState, LauncherPhase, derive_state
from controller.reconciler import InstanceView, launch_backoff_s
from controller.records import AgentRecord, InstanceRecord
from controller.routes import ModelRoute

DEFAULT_STARTUP_TIMEOUT_S = 900.0
"""An instance whose model left the catalog gets this long to become READY."""


def agent_of(inst: InstanceRecord, agents: Mapping[str, AgentRecord]) -> AgentRecord | None:
    """The agent registered for `inst`; None before its agent registered."""
    return agents.get(inst.agent_id) if inst.agent_id else None


def instance_facts(
    inst: InstanceRecord,
    agent: AgentRecord | None,
    spec: ModelSpec | None,
    now: float,
    *,
    started_at: float,
    agent_stale_after_s: float,
    reconnect_grace_s: float,
) -> InstanceFacts:
    """Everything observed about `inst` at `now`, for lifecycle.derive_state.

    `agent` is its agent (see `agent_of`), `spec` its model's catalog entry (None:
    the model left the catalog). An agent silent for `agent_stale_after_s` counts
    as lost even if its stream looks open. Within `reconnect_grace_s` of
    `started_at` (this controller's start) an agent attached before may still
    come back; after it, it will not."""
    connected = agent is not None and agent.connected
    stale = connected and agent is not None and (now - agent.last_report_at > agent_stale_after_s)
    # An agent that registered with this controller and has not opened its
    # Session yet (a busy controller accepts it later) is starting its session,
    # not one that may come back after a restart; it is lost only if that
    # takes agent_stale_after_s.
    opening = (
        agent is not None and not connected and agent.registered_at >= started_at
        and not inst.agent_lost
    )  # fmt: skip
    never_opened = (
        opening and agent is not None and (now - agent.registered_at > agent_stale_after_s)
    )
    if never_opened:
        stale = True
    reconnect_window = (
        inst.ever_registered and not connected and not inst.agent_lost and not opening
    )
    in_grace = now - started_at < reconnect_grace_s
    return InstanceFacts(
        previous=inst.state,
        submitted=bool(inst.launcher_ref),
        launch_error=inst.launch_error,
        launcher_phase=inst.launcher_phase,
        launcher_reason=inst.launcher_reason,
        stop_requested=inst.stop_requested,
        agent_connected=connected and not stale,
        agent_phase=agent.phase if agent is not None else None,
        agent_detail=agent.detail if agent is not None else "",
        agent_lost=inst.agent_lost or stale,
        agent_lost_reason=inst.agent_lost_reason
        or ("agent registered but never opened its session" if never_opened else "")
        or ("agent sent no report for too long" if stale else ""),
        awaiting_reconnect=reconnect_window and in_grace,
        reconnect_expired=reconnect_window and not in_grace,
        age_s=now - inst.created_at,
        startup_timeout_s=spec.startup_timeout_s if spec is not None else DEFAULT_STARTUP_TIMEOUT_S,
    )


def next_state(
    inst: InstanceRecord, facts: InstanceFacts, started_at: float
) -> tuple[InstanceState, str]:
    """`inst`'s state and reason from `facts` (lifecycle.derive_state); '' as the
    reason keeps the one it has.

    An instance that failed through its agent (a job's agent leaves when SLURM
    signals it) may learn why from its launcher a poll later: the reason then
    keeps both. Only for failures seen by this controller (since `started_at`)."""
    state, reason = derive_state(facts)
    if state is InstanceState.FAILED and inst.state is InstanceState.FAILED:
        ended = inst.launcher_phase is LauncherPhase.ENDED and inst.launcher_reason
        recent = inst.updated_at >= started_at
        if ended and recent and inst.launcher_reason not in inst.reason:
            reason = f"{inst.reason}; {inst.launcher_reason}"
    return state, reason


def instance_views(
    instances: Iterable[InstanceRecord], agents: Mapping[str, AgentRecord], now: float
) -> list[InstanceView]:
    """What the reconciler needs to know about each instance at `now`."""
    out = []
    for inst in instances:
        agent = agent_of(inst, agents)
        out.append(
            InstanceView(
                id=inst.id,
                model=inst.model,
                state=inst.state,
                created_seq=inst.seq,
                process_alive=bool(inst.launcher_ref)
                and inst.launcher_phase is not LauncherPhase.ENDED,
                stop_requested=inst.stop_requested,
                stop_sent=inst.stop_sent,
                agent_connected=agent is not None and agent.connected,
                draining_for_s=now - inst.stop_requested_at if inst.stop_requested else 0.0,
                ends_in_s=inst.launcher_ends_at - now
                if inst.launcher_ends_at is not None
                and inst.launcher_phase is LauncherPhase.RUNNING
                else None,
                # READY since before this controller started: long settled.
                ready_for_s=now - inst.ready_at if inst.ready_at else math.inf,
                load=agent.in_flight + agent.queued if agent is not None else 0,
            )
        )
    return out


def held_back(
    specs: Iterable[ModelSpec], instances: Collection[InstanceRecord], now: float
) -> list[str]:
    """Models whose newest launches failed in a row and whose backoff
    (reconciler.launch_backoff_s, counted from the newest failure) runs at `now`."""
    held = []
    for spec in specs:
        newest_first = sorted((i for i in instances if i.model == spec.name), key=lambda i: -i.seq)
        failures = 0
        for inst in newest_first:
            if inst.state is not InstanceState.FAILED:
                break
            failures += 1
        if failures and now - newest_first[0].updated_at < launch_backoff_s(failures):
            held.append(spec.name)
    return held


def idle_models(
    demanded: Iterable[str],
    demanded_at: Mapping[str, float],
    specs: Mapping[str, ModelSpec],
    instances: Collection[InstanceRecord],
    agents: Mapping[str, AgentRecord],
    now: float,
) -> dict[str, float]:
    """The demanded models idle past their idle_timeout_s at `now`, with the
    seconds each has been idle.

    A model is busy when EnsureModel asked for it (`demanded_at`) or a READY
    instance's agent last saw a request; an instance still starting (a cold
    start may outlast the timeout) keeps it busy. Draining and ended instances
    do not count."""
    idle: dict[str, float] = {}
    for model in demanded:
        spec = specs.get(model)
        if spec is None or spec.idle_timeout_s is None:
            continue
        busy = [demanded_at.get(model, 0.0)]
        for inst in instances:
            if inst.model != model or inst.state.ended or inst.stop_requested:
                continue
            agent = agents.get(inst.agent_id)
            ready = inst.state is InstanceState.READY and agent is not None
            busy.append(agent.last_busy_at or now if ready and agent else now)
        if now - max(busy) >= spec.idle_timeout_s:
            idle[model] = now - max(busy)
    return idle


def route_signature(routes: Sequence[ModelRoute]) -> object:
    """What facades see of the routes: equal signatures, nothing to publish."""
    return [
        (r.summary.spec, r.summary.state, r.summary.message, r.summary.ready_replicas,
         r.summary.live_replicas, r.endpoints)
        for r in routes
    ]  # fmt: skip
