"""The fleet: the controller's live view of instances and agents.

Agents and launchers report facts here; `refresh` derives every instance's
state from them (controller/lifecycle.py), persists what changed and wakes
route watchers when the route table changes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from pydantic import ValidationError

from controller.catalog import Catalog, ModelSpec
from controller.lifecycle import (
    AgentPhase,
    InstanceFacts,
    InstanceState,
    LauncherPhase,
    derive_state,
)
from controller.reconciler import (
    InstanceView,
    Scale,
    launch_backoff_s,
    load_recommendation,
    stabilised,
)
from controller.records import AgentRecord, HostedState, InstanceRecord
from controller.routes import ModelRoute, ModelSummary, build_routes, summarize
from controller.store.sqlite import SqliteStore
from kscope_common.pki import Identity
from kscope_common.request_stats import RequestTotals

log = logging.getLogger(__name__)


class FleetError(Exception):
    """Base of the errors the fleet raises to its callers."""


class NotAuthenticated(FleetError):
    """The caller's identity is not the one this needs."""


class Forbidden(FleetError):
    """The caller is known but may not do this (an agent acting for another instance)."""


def check_agent_identity(identity: Identity | None, instance_id: str, host_agent: bool) -> None:
    """An agent registers only as what its certificate names: the agent of
    that one instance, or that one host's host agent. None: plaintext mode."""
    if identity is None:
        return
    if identity.instance_id:
        if host_agent or identity.instance_id != instance_id:
            raise Forbidden(f"{identity} may not register for instance {instance_id or '(none)'}")
    elif identity.host:
        if not host_agent or instance_id:
            raise Forbidden(f"{identity} may register only as its host's host agent")
    else:
        raise Forbidden(f"{identity} is not an agent")


class Invalid(FleetError):
    """The request asks for something impossible (min_replicas above max_replicas)."""


class UnknownEntity(FleetError):
    """An instance, agent or model the controller does not know."""


class Refused(FleetError):
    """The request is understood but not allowed in the current state."""


@dataclass(frozen=True)
class DrainCommand:
    """Ask an agent to stop taking requests, finish its in-flight ones, then exit."""

    reason: str


@dataclass(frozen=True)
class LoadModelCommand:
    """Ask a host agent to start an instance of a model it offers."""

    instance_id: str
    spec: ModelSpec
    enroll_token: str = ""
    """The instance agent's one-time enrollment token (empty in plaintext mode)."""


@dataclass(frozen=True)
class UnloadModelCommand:
    """Ask a host agent to stop an instance it started."""

    instance_id: str


@dataclass(frozen=True)
class RevokedCommand:
    """The whole list of revoked facade and host enrollments: the agent refuses
    their certificates and closes their streams."""

    enrollment_ids: frozenset[str]


AgentCommand = DrainCommand | LoadModelCommand | UnloadModelCommand | RevokedCommand


@dataclass
class _Session:
    commands: asyncio.Queue[AgentCommand] = field(default_factory=asyncio.Queue)


@dataclass(frozen=True)
class FleetTimings:
    """How patient the fleet is."""

    report_interval_s: float = 1.0
    """How often agents send load reports."""
    agent_stale_after_s: float = 10.0
    """An agent silent this long is lost even if its stream looks open."""
    reconnect_grace_s: float = 15.0
    """After a controller restart, how long agents have to reconnect."""


class Fleet:
    """Instances, agents, demand and routes; persisted through the store."""

    def __init__(
        self,
        store: SqliteStore,
        catalog: Catalog,
        timings: FleetTimings | None = None,
    ):
        self._store = store
        self.catalog = catalog
        self.timings = timings or FleetTimings()
        self.instances: dict[str, InstanceRecord] = {}
        self.agents: dict[str, AgentRecord] = {}
        self._sessions: dict[str, _Session] = {}
        self.demanded: set[str] = set()
        self.demanded_at: dict[str, float] = {}
        """When EnsureModel last asked for each model."""
        self._started_at = time.time()
        self._next_seq = 1
        self.route_version = 0
        self._route_signature: object = None
        self._routes_changed = asyncio.Condition()
        self._load_samples: dict[str, list[tuple[float, int]]] = {}
        """Per model with a target_in_flight: (time, instances its load called for)."""
        self.failures: dict[str, int] = {}
        """Instances that failed since this controller started, by model (/metrics)."""
        self.revoked_enrollments: frozenset[str] = frozenset()
        """Revoked facade and host enrollments, which every agent is told."""
        self.wake = asyncio.Event()
        """Set when something happened that the control loop should act on now."""

    async def load(self) -> None:
        """Bring back instances and agents from the store after a (re)start."""
        for inst in await self._store.load_instances():
            self.instances[inst.id] = inst
            self._next_seq = max(self._next_seq, inst.seq + 1)
            if inst.state is InstanceState.READY:
                self.demanded.add(inst.model)
        for agent in await self._store.load_agents():
            self.agents[agent.id] = agent
        log.info("loaded %d instances and %d agents", len(self.instances), len(self.agents))

    # --- identities --------------------------------------------------------------------------

    def instance_waiting(self, instance_id: str, renewal: bool) -> str | None:
        """None while `instance_id` may take an agent's enrollment (it lives and
        none enrolled yet; for a renewal, while it lives), else why not."""
        inst = self.instances.get(instance_id)
        if inst is None:
            return "no such instance"
        if inst.state.ended:
            return f"it is {inst.state.value}"
        if not renewal and (inst.ever_registered or inst.stop_requested):
            return "its agent already enrolled" if inst.ever_registered else "it is stopping"
        return None

    def set_revoked(self, enrollment_ids: frozenset[str]) -> None:
        """Tell every connected agent the new revoked list."""
        if enrollment_ids == self.revoked_enrollments:
            return
        self.revoked_enrollments = enrollment_ids
        for session in self._sessions.values():
            session.commands.put_nowait(RevokedCommand(enrollment_ids))

    # --- instances ---------------------------------------------------------------------------

    async def create_instance(self, spec: ModelSpec) -> InstanceRecord:
        now = time.time()
        inst = InstanceRecord(
            id=f"{spec.name.replace('/', '-')}-{uuid.uuid4().hex[:8]}",
            model=spec.name,
            launcher=spec.launcher,
            seq=self._next_seq,
            created_at=now,
            updated_at=now,
            reason="waiting to be launched",
        )
        self._next_seq += 1
        self.instances[inst.id] = inst
        await self._store.save_instance(inst)
        return inst

    async def save(self, inst: InstanceRecord) -> None:
        inst.updated_at = time.time()
        await self._store.save_instance(inst)

    def demand(self, model: str) -> ModelSummary:
        """Note that clients want `model`; return its summary now."""
        spec = self.catalog.get(model)
        if spec is None:
            raise UnknownEntity(f"model {model!r} is not in the catalog")
        self.demanded_at[model] = time.time()
        if model not in self.demanded:
            self.demanded.add(model)
            self.wake.set()
        return summarize(spec, self._instances_of(model), time.time())

    async def scale(
        self, model: str, min_replicas: int | None, max_replicas: int | None
    ) -> ModelSpec:
        """New replica bounds for `model`, kept in the store like the catalog."""
        spec = self.catalog.get(model)
        if spec is None:
            raise UnknownEntity(f"model {model!r} is not in the catalog")
        changes = {
            k: v for k, v in (("min_replicas", min_replicas), ("max_replicas", max_replicas))
            if v is not None
        }  # fmt: skip
        try:
            scaled = ModelSpec.model_validate({**spec.model_dump(), **changes})
        except ValidationError as exc:
            problems = "; ".join(str(e["msg"]) for e in exc.errors())
            raise Invalid(f"model {model!r}: {problems}") from None
        self.catalog = Catalog(
            models=tuple(scaled if m.name == model else m for m in self.catalog.models)
        )
        await self._store.save_catalog(self.catalog)
        log.info("model %s scaled to %d..%d replicas", model, scaled.min_replicas,
                 scaled.max_replicas)  # fmt: skip
        self.wake.set()
        return scaled

    def expire_idle_demand(self, now: float) -> None:
        """Forget the demand for models idle past their idle_timeout_s, so the
        reconciler drains them down to min_replicas (a host agent unloads them)."""
        for model in list(self.demanded):
            spec = self.catalog.get(model)
            if spec is None or spec.idle_timeout_s is None:
                continue
            busy = [self.demanded_at.get(model, 0.0)]
            for inst in self._instances_of(model):
                if inst.state.ended or inst.stop_requested:
                    continue
                agent = self.agents.get(inst.agent_id)
                # One still starting (a cold start may outlast the timeout) is not idle.
                ready = inst.state is InstanceState.READY and agent is not None
                busy.append(agent.last_busy_at or now if ready and agent else now)
            if now - max(busy) >= spec.idle_timeout_s:
                log.info("model %s idle for %.0f s: unloading", model, now - max(busy))
                self.demanded.discard(model)
                self.wake.set()

    def _instances_of(self, model: str) -> list[InstanceRecord]:
        return [i for i in self.instances.values() if i.model == model]

    async def request_stop(self, instance_id: str) -> InstanceRecord:
        """Mark an instance to be drained and stopped."""
        inst = self.instances.get(instance_id)
        if inst is None:
            raise UnknownEntity(f"instance {instance_id!r} does not exist")
        if not inst.stop_requested and not inst.state.ended:
            inst.stop_requested = True
            inst.stop_requested_at = time.time()
            await self.save(inst)
            agent = self.agents.get(inst.agent_id)
            if agent is not None and agent.connected:
                self.send(agent.id, DrainCommand("the controller stops this instance"))
            self.wake.set()
        return inst

    # --- agents ------------------------------------------------------------------------------

    async def register_agent(self, agent: AgentRecord) -> AgentRecord:
        """Attach a (re)registering agent to its instance; returns it with its id."""
        inst = self.instances.get(agent.instance_id)
        if not agent.instance_id:
            return await self._register_host_agent(agent)
        if inst is None:
            raise UnknownEntity(f"instance {agent.instance_id!r} does not exist")
        if inst.state.ended:
            raise Refused(f"instance {inst.id} is {inst.state.value}: {inst.reason}")
        # An agent that reconnects keeps its id, so operators can follow it.
        agent.id = inst.agent_id or f"agent-{uuid.uuid4().hex[:10]}"
        agent.registered_at = agent.last_report_at = time.time()
        self.agents[agent.id] = agent
        inst.agent_id = agent.id
        inst.agent_address = agent.address
        inst.engine_url = agent.engine_url
        inst.ever_registered = True
        inst.agent_lost = False
        await self._store.save_agent(agent)
        await self.save(inst)
        log.info("agent %s registered for instance %s at %s", agent.id, inst.id, agent.address)
        return agent

    async def _register_host_agent(self, agent: AgentRecord) -> AgentRecord:
        """A host agent has no instance: it is kept by its address, so one that
        reconnects keeps its id (and the instances the host launcher placed on it)."""
        if not agent.host_agent:
            raise Refused("an agent without an instance id must register as a host agent")

        def same_host(a: AgentRecord) -> bool:
            # Its certificate names the host; without TLS, only the address can.
            return a.identity == agent.identity if agent.identity else a.address == agent.address

        known = [a for a in self.agents.values() if a.host_agent and same_host(a)]
        agent.id = known[0].id if known else f"host-{uuid.uuid4().hex[:10]}"
        agent.registered_at = agent.last_report_at = time.time()
        self.agents[agent.id] = agent
        await self._store.save_agent(agent)
        log.info("host agent %s registered at %s offering %s", agent.id, agent.address,
                 ", ".join(agent.models) or "no models")  # fmt: skip
        self.wake.set()
        return agent

    def open_session(self, agent_id: str, identity: str | None) -> asyncio.Queue[AgentCommand]:
        """The agent's Session stream opened; returns the queue of its commands.
        `identity` is the caller's certificate identity (None: plaintext mode),
        which must be the one that registered `agent_id`."""
        agent = self.agents.get(agent_id)
        if agent is None:
            raise UnknownEntity(f"agent {agent_id!r} is not registered")
        if identity is not None and agent.identity != identity:
            raise NotAuthenticated(f"agent {agent_id} is not {identity}")
        session = _Session()
        session.commands.put_nowait(RevokedCommand(self.revoked_enrollments))
        self._sessions[agent_id] = session
        agent.connected = True
        agent.last_report_at = time.time()
        inst = self.instances.get(agent.instance_id)
        if inst is not None and inst.stop_requested:
            session.commands.put_nowait(DrainCommand("the controller stops this instance"))
        self.wake.set()
        return session.commands

    def report(
        self,
        agent_id: str,
        phase: AgentPhase,
        in_flight: int,
        queued: int,
        detail: str,
        totals: RequestTotals,
        max_concurrency: int = 0,
        max_queue_size: int = 0,
        hosted: Mapping[str, HostedState] | None = None,
    ) -> None:
        agent = self.agents.get(agent_id)
        if agent is None:
            return
        changed = agent.phase is not phase
        now = time.time()
        if in_flight or queued or totals.served != agent.totals.served or not agent.last_busy_at:
            agent.last_busy_at = now
        agent.phase, agent.in_flight, agent.queued, agent.detail = phase, in_flight, queued, detail
        agent.max_concurrency, agent.max_queue_size = max_concurrency, max_queue_size
        agent.totals = totals
        if hosted is not None:
            changed = changed or dict(hosted) != agent.hosted
            agent.hosted = dict(hosted)
        agent.last_report_at = time.time()
        if changed:
            self.wake.set()

    def close_session(self, agent_id: str, commands: asyncio.Queue[AgentCommand]) -> None:
        """The agent's Session stream ended: the agent is lost unless it was
        stopping anyway."""
        session = self._sessions.get(agent_id)
        if session is None or session.commands is not commands:
            return  # a newer session replaced this one
        del self._sessions[agent_id]
        agent = self.agents.get(agent_id)
        if agent is None:
            return
        agent.connected = False
        inst = self.instances.get(agent.instance_id)
        if inst is not None and not inst.stop_requested:
            inst.agent_lost = True
            if agent.phase is AgentPhase.DRAINING:
                inst.agent_lost_reason = f"agent drained and left on its own ({agent.detail})"
            else:
                inst.agent_lost_reason = "agent lost: its session with the controller broke"
            log.warning("agent %s of instance %s: %s", agent_id, inst.id, inst.agent_lost_reason)
        self.wake.set()

    def send(self, agent_id: str, command: AgentCommand) -> None:
        session = self._sessions.get(agent_id)
        if session is not None:
            session.commands.put_nowait(command)

    # --- state -------------------------------------------------------------------------------

    def facts(self, inst: InstanceRecord, now: float) -> InstanceFacts:
        agent = self.agents.get(inst.agent_id) if inst.agent_id else None
        connected = agent is not None and agent.connected
        stale = (
            connected
            and agent is not None
            and (now - agent.last_report_at > self.timings.agent_stale_after_s)
        )
        reconnect_window = inst.ever_registered and not connected and not inst.agent_lost
        in_grace = now - self._started_at < self.timings.reconnect_grace_s
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
            or ("agent sent no report for too long" if stale else ""),
            awaiting_reconnect=reconnect_window and in_grace,
            reconnect_expired=reconnect_window and not in_grace,
            age_s=now - inst.created_at,
            startup_timeout_s=self._startup_timeout(inst.model),
        )

    def _startup_timeout(self, model: str) -> float:
        spec = self.catalog.get(model)
        return spec.startup_timeout_s if spec is not None else 900.0

    async def refresh(self) -> None:
        """Derive every instance's state from the facts; persist and publish changes."""
        now = time.time()
        self.expire_idle_demand(now)
        for inst in list(self.instances.values()):
            state, reason = derive_state(self.facts(inst, now))
            if state is InstanceState.FAILED and inst.state is InstanceState.FAILED:
                # An instance that failed through its agent (a job's agent leaves
                # when SLURM signals it) may learn why from its launcher a poll
                # later: keep both. Only for failures seen by this controller.
                ended = inst.launcher_phase is LauncherPhase.ENDED and inst.launcher_reason
                recent = inst.updated_at >= self._started_at
                if ended and recent and inst.launcher_reason not in inst.reason:
                    reason = f"{inst.reason}; {inst.launcher_reason}"
            if state is inst.state and (reason == inst.reason or not reason):
                continue
            if state is InstanceState.READY and inst.state is not InstanceState.READY:
                inst.ready_at = now
            if state is InstanceState.FAILED and inst.state is not InstanceState.FAILED:
                self.failures[inst.model] = self.failures.get(inst.model, 0) + 1
            if state is not inst.state:
                log.info(
                    "instance %s (%s): %s -> %s: %s",
                    inst.id, inst.model, inst.state.value, state.value, reason,
                )  # fmt: skip
            inst.state = state
            inst.reason = reason or inst.reason
            await self.save(inst)
        await self._publish_if_changed(now)

    def observe_launcher(
        self,
        inst: InstanceRecord,
        phase: LauncherPhase,
        reason: str,
        expected_start: float | None = None,
        ends_at: float | None = None,
    ) -> None:
        inst.launcher_phase, inst.launcher_reason = phase, reason
        inst.launcher_expected_start, inst.launcher_ends_at = expected_start, ends_at

    # --- routes ------------------------------------------------------------------------------

    def routes(self) -> list[ModelRoute]:
        return build_routes(self.catalog.models, list(self.instances.values()), time.time())

    async def _publish_if_changed(self, now: float) -> None:
        routes = build_routes(self.catalog.models, list(self.instances.values()), now)
        signature = [
            (r.summary.spec, r.summary.state, r.summary.message, r.summary.ready_replicas,
             r.summary.live_replicas, r.endpoints)
            for r in routes
        ]  # fmt: skip
        if signature == self._route_signature:
            return
        self._route_signature = signature
        async with self._routes_changed:
            self.route_version += 1
            self._routes_changed.notify_all()

    async def wait_for_routes(self, seen_version: int, timeout: float) -> int:
        """Wait until the route version passes `seen_version` (or the timeout)."""
        async with self._routes_changed:
            try:
                await asyncio.wait_for(
                    self._routes_changed.wait_for(lambda: self.route_version > seen_version),
                    timeout,
                )
            except TimeoutError:
                pass
            return self.route_version

    def views(self) -> list[InstanceView]:
        now = time.time()
        out = []
        for inst in self.instances.values():
            agent = self.agents.get(inst.agent_id)
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

    def scale_by_load(self, now: float) -> dict[str, Scale]:
        """Sample each scaled model's load and return what it calls for once
        stabilised over the model's windows (see reconciler.stabilised)."""
        out: dict[str, Scale] = {}
        for spec in self.catalog.models:
            if spec.target_in_flight is None:
                continue
            live = [
                i
                for i in self._instances_of(spec.name)
                if not i.state.ended and not i.stop_requested
            ]
            load = 0
            for inst in live:
                agent = self.agents.get(inst.agent_id)
                if agent is not None and agent.connected:
                    load += agent.in_flight + agent.queued
            samples = self._load_samples.setdefault(spec.name, [])
            samples.append((now, load_recommendation(spec, load)))
            keep = max(spec.scale_up_window_s, spec.scale_down_window_s) + 5.0
            # Keep one sample older than the longest window: it shows the window is covered.
            while len(samples) > 1 and samples[1][0] <= now - keep:
                samples.pop(0)
            out[spec.name] = stabilised(samples, now, len(live), spec)
        return out

    def held_back(self) -> list[str]:
        """Models whose recent launches failed in a row and whose backoff runs."""
        now = time.time()
        held = []
        for spec in self.catalog.models:
            newest_first = sorted(self._instances_of(spec.name), key=lambda i: -i.seq)
            failures = 0
            for inst in newest_first:
                if inst.state is not InstanceState.FAILED:
                    break
                failures += 1
            if failures and now - newest_first[0].updated_at < launch_backoff_s(failures):
                held.append(spec.name)
        return held

    def specs(self) -> Mapping[str, ModelSpec]:
        return {m.name: m for m in self.catalog.models}
