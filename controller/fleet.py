"""The fleet: the controller's live view of instances and agents.

Agents and launchers report facts here; `refresh` derives every instance's
state from them (controller/lifecycle.py, through controller/fleet_views.py),
persists what changed and wakes route watchers when the route table changes.

The fleet keeps the records, their persistence and the agents' sessions, and
is the only one that changes them: other modules read `instances` and
`agents` (read-only mappings) and change records through its methods. What
the records mean at a moment (facts, the reconciler's views, launch backoff,
idle models) is computed by the pure functions of controller/fleet_views.py,
with the `now` the control loop passes down.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from pydantic import ValidationError

from controller.catalog import Catalog, ModelSpec
from controller.fleet_views import (
    agent_of,
    idle_models,
    instance_facts,
    next_state,
    route_signature,
)
from controller.lifecycle import AgentPhase, InstanceState, LauncherPhase
from controller.records import AgentRecord, HostedState, InstanceRecord, union_of
from controller.routes import ModelRoute, ModelSummary, build_routes, summarize
from controller.store.sqlite import SqliteStore
from kscope_common.capabilities import Capabilities
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


@dataclass(frozen=True)
class AgentReport:
    """One load report from an agent's Session stream, as the controller reads it."""

    agent_id: str
    """The agent that sent it (the one its session registered as)."""
    phase: AgentPhase
    in_flight: int
    """Requests its engine works on now."""
    queued: int
    """Requests waiting in its queue."""
    detail: str
    """What it says about its phase, in words."""
    totals: RequestTotals
    """The requests that ended since the agent started."""
    max_concurrency: int = 0
    """Its queue limits (0: no limit)."""
    max_queue_size: int = 0
    hosted: Mapping[str, HostedState] | None = None
    """A host agent's instances, by instance id; None: not a host agent's report."""
    queued_by_caller: Mapping[str, int] = field(default_factory=dict)
    """Waiting requests per caller (the key's owner)."""
    capabilities: Capabilities | None = None
    """What its instance can do, when the report says (they changed); None: unchanged."""


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
        clock: Callable[[], float] = time.time,
    ):
        """`clock` stamps the records (created, updated, reported); what they
        mean is judged by the `now` the control loop passes to `refresh`."""
        self._store = store
        self._catalog = catalog
        self._timings = timings or FleetTimings()
        self._clock = clock
        self._instances: dict[str, InstanceRecord] = {}
        self._agents: dict[str, AgentRecord] = {}
        self._sessions: dict[str, _Session] = {}
        self._demanded: set[str] = set()
        self._demanded_at: dict[str, float] = {}
        """When EnsureModel last asked for each model."""
        self._started_at = clock()
        self._next_seq = 1
        self._route_version = 0
        self._route_signature: object = None
        self._routes_changed = asyncio.Condition()
        self._failures: dict[str, int] = {}
        """Instances that failed since this controller started, by model (/metrics)."""
        self._revoked_enrollments: frozenset[str] = frozenset()
        self._last_capabilities: dict[str, Capabilities] = {}
        """What an instance of each model last said it can do (runtime only):
        a model without live instances still shows its capabilities."""
        self.wake = asyncio.Event()
        """Set when something happened that the control loop should act on now."""

    async def load(self) -> None:
        """Bring back instances and agents from the store after a (re)start."""
        for inst in await self._store.load_instances():
            self._instances[inst.id] = inst
            self._next_seq = max(self._next_seq, inst.seq + 1)
            if inst.state is InstanceState.READY:
                self._demanded.add(inst.model)
        for agent in await self._store.load_agents():
            self._agents[agent.id] = agent
        log.info("loaded %d instances and %d agents", len(self._instances), len(self._agents))

    # --- what others read --------------------------------------------------------------------

    @property
    def instances(self) -> Mapping[str, InstanceRecord]:
        """Every instance, by id (read-only: change them through the fleet)."""
        return MappingProxyType(self._instances)

    @property
    def agents(self) -> Mapping[str, AgentRecord]:
        """Every registered agent, by id (read-only)."""
        return MappingProxyType(self._agents)

    @property
    def catalog(self) -> Catalog:
        return self._catalog

    @property
    def timings(self) -> FleetTimings:
        return self._timings

    @property
    def demanded(self) -> frozenset[str]:
        """Models clients want (EnsureModel), until their idle_timeout_s lapses."""
        return frozenset(self._demanded)

    @property
    def failures(self) -> Mapping[str, int]:
        """Instances that failed since this controller started, by model (/metrics)."""
        return MappingProxyType(self._failures)

    @property
    def revoked_enrollments(self) -> frozenset[str]:
        """Revoked facade and host enrollments, which every agent is told."""
        return self._revoked_enrollments

    @property
    def route_version(self) -> int:
        """Goes up each time the route table changes."""
        return self._route_version

    def specs(self) -> Mapping[str, ModelSpec]:
        return {m.name: m for m in self._catalog.models}

    # --- identities --------------------------------------------------------------------------

    def instance_waiting(self, instance_id: str, renewal: bool) -> str | None:
        """None while `instance_id` may take an agent's enrollment (it lives and
        none enrolled yet; for a renewal, while it lives), else why not."""
        inst = self._instances.get(instance_id)
        if inst is None:
            return "no such instance"
        if inst.state.ended:
            return f"it is {inst.state.value}"
        if not renewal and (inst.ever_registered or inst.stop_requested):
            return "its agent already enrolled" if inst.ever_registered else "it is stopping"
        return None

    def set_revoked(self, enrollment_ids: frozenset[str]) -> None:
        """Tell every connected agent the new revoked list."""
        if enrollment_ids == self._revoked_enrollments:
            return
        self._revoked_enrollments = enrollment_ids
        for session in self._sessions.values():
            session.commands.put_nowait(RevokedCommand(enrollment_ids))

    # --- instances ---------------------------------------------------------------------------

    async def create_instance(self, spec: ModelSpec) -> InstanceRecord:
        now = self._clock()
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
        self._instances[inst.id] = inst
        await self._store.save_instance(inst)
        return inst

    async def save(self, inst: InstanceRecord) -> None:
        inst.updated_at = self._clock()
        await self._store.save_instance(inst)

    async def record_launch(self, instance_id: str, launcher_ref: str) -> None:
        """The launcher accepted the instance (or, after a restart, its job was
        found) under `launcher_ref`."""
        inst = self._instances[instance_id]
        inst.launcher_ref = launcher_ref
        await self.save(inst)

    async def record_launch_error(self, instance_id: str, error: str) -> None:
        """The instance could not be launched, and why (it becomes FAILED)."""
        inst = self._instances[instance_id]
        inst.launch_error = error
        await self.save(inst)

    async def mark_stop_sent(self, instance_id: str) -> None:
        """Its launcher was told to stop it: the reconciler does not ask again."""
        inst = self._instances[instance_id]
        inst.stop_sent = True
        await self.save(inst)

    def stop_failed(self, instance_id: str) -> None:
        """Telling its launcher to stop it failed: the next reconcile pass asks again."""
        inst = self._instances.get(instance_id)
        if inst is not None:
            inst.stop_sent = False

    def demand(self, model: str) -> ModelSummary:
        """Note that clients want `model` (or the model an alias or LoRA adapter
        of that name belongs to); return its summary now."""
        spec = self._catalog.resolve(model)
        if spec is None:
            raise UnknownEntity(f"model {model!r} is not in the catalog")
        model = spec.name
        now = self._clock()
        self._demanded_at[model] = now
        if model not in self._demanded:
            self._demanded.add(model)
            self.wake.set()
        return summarize(spec, self._instances_of(model), now)

    async def scale(
        self, model: str, min_replicas: int | None, max_replicas: int | None
    ) -> ModelSpec:
        """New replica bounds for `model`, kept in the store like the catalog."""
        spec = self._catalog.get(model)
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
        self._catalog = Catalog(
            models=tuple(scaled if m.name == model else m for m in self._catalog.models)
        )
        await self._store.save_catalog(self._catalog)
        log.info("model %s scaled to %d..%d replicas", model, scaled.min_replicas,
                 scaled.max_replicas)  # fmt: skip
        self.wake.set()
        return scaled

    def expire_idle_demand(self, now: float) -> None:
        """Forget the demand for models idle past their idle_timeout_s at `now`,
        so the reconciler drains them down to min_replicas (a host agent unloads
        them)."""
        idle = idle_models(
            list(self._demanded), self._demanded_at, self.specs(),
            list(self._instances.values()), self._agents, now,
        )  # fmt: skip
        for model, idle_s in idle.items():
            log.info("model %s idle for %.0f s: unloading", model, idle_s)
            self._demanded.discard(model)
            self.wake.set()

    def _instances_of(self, model: str) -> list[InstanceRecord]:
        return [i for i in self._instances.values() if i.model == model]

    async def request_stop(self, instance_id: str) -> InstanceRecord:
        """Mark an instance to be drained and stopped."""
        inst = self._instances.get(instance_id)
        if inst is None:
            raise UnknownEntity(f"instance {instance_id!r} does not exist")
        if not inst.stop_requested and not inst.state.ended:
            inst.stop_requested = True
            inst.stop_requested_at = self._clock()
            await self.save(inst)
            agent = self._agents.get(inst.agent_id)
            if agent is not None and agent.connected:
                self.send(agent.id, DrainCommand("the controller stops this instance"))
            self.wake.set()
        return inst

    # --- agents ------------------------------------------------------------------------------

    async def register_agent(self, agent: AgentRecord) -> AgentRecord:
        """Attach a (re)registering agent to its instance; returns it with its id."""
        inst = self._instances.get(agent.instance_id)
        if not agent.instance_id:
            return await self._register_host_agent(agent)
        if inst is None:
            raise UnknownEntity(f"instance {agent.instance_id!r} does not exist")
        if inst.state.ended:
            raise Refused(f"instance {inst.id} is {inst.state.value}: {inst.reason}")
        # An agent that reconnects keeps its id, so operators can follow it.
        agent.id = inst.agent_id or f"agent-{uuid.uuid4().hex[:10]}"
        agent.registered_at = agent.last_report_at = self._clock()
        self._agents[agent.id] = agent
        inst.agent_id = agent.id
        inst.agent_address = agent.address
        inst.engine_url = agent.engine_url
        inst.ever_registered = True
        inst.agent_lost = False
        if agent.capabilities is not None:
            self._last_capabilities[inst.model] = agent.capabilities
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

        known = [a for a in self._agents.values() if a.host_agent and same_host(a)]
        agent.id = known[0].id if known else f"host-{uuid.uuid4().hex[:10]}"
        agent.registered_at = agent.last_report_at = self._clock()
        self._agents[agent.id] = agent
        await self._store.save_agent(agent)
        log.info("host agent %s registered at %s offering %s", agent.id, agent.address,
                 ", ".join(agent.models) or "no models")  # fmt: skip
        self.wake.set()
        return agent

    def open_session(self, agent_id: str, identity: str | None) -> asyncio.Queue[AgentCommand]:
        """The agent's Session stream opened; returns the queue of its commands.
        `identity` is the caller's certificate identity (None: plaintext mode),
        which must be the one that registered `agent_id`."""
        agent = self._agents.get(agent_id)
        if agent is None:
            raise UnknownEntity(f"agent {agent_id!r} is not registered")
        if identity is not None and agent.identity != identity:
            raise NotAuthenticated(f"agent {agent_id} is not {identity}")
        session = _Session()
        session.commands.put_nowait(RevokedCommand(self._revoked_enrollments))
        self._sessions[agent_id] = session
        agent.connected = True
        agent.last_report_at = self._clock()
        inst = self._instances.get(agent.instance_id)
        if inst is not None and inst.stop_requested:
            session.commands.put_nowait(DrainCommand("the controller stops this instance"))
        self.wake.set()
        return session.commands

    def report(self, report: AgentReport) -> None:
        """An agent's load report: its phase, load, totals (and hosted instances)."""
        agent = self._agents.get(report.agent_id)
        if agent is None:
            return
        changed = agent.phase is not report.phase
        now = self._clock()
        served_more = report.totals.served != agent.totals.served
        if report.in_flight or report.queued or served_more or not agent.last_busy_at:
            agent.last_busy_at = now
        agent.phase, agent.detail = report.phase, report.detail
        agent.in_flight, agent.queued = report.in_flight, report.queued
        agent.queued_by_caller = dict(report.queued_by_caller)
        agent.max_concurrency, agent.max_queue_size = report.max_concurrency, report.max_queue_size
        agent.totals = report.totals
        if report.capabilities is not None and report.capabilities != agent.capabilities:
            agent.capabilities = report.capabilities
            inst = self._instances.get(agent.instance_id)
            if inst is not None:
                self._last_capabilities[inst.model] = report.capabilities
                log.info("instance %s can now: %s", inst.id, report.capabilities)
            changed = True
        if report.hosted is not None:
            changed = changed or dict(report.hosted) != agent.hosted
            agent.hosted = dict(report.hosted)
        agent.last_report_at = now
        if changed:
            self.wake.set()

    def close_session(self, agent_id: str, commands: asyncio.Queue[AgentCommand]) -> None:
        """The agent's Session stream ended: the agent is lost unless it was
        stopping anyway."""
        session = self._sessions.get(agent_id)
        if session is None or session.commands is not commands:
            return  # a newer session replaced this one
        del self._sessions[agent_id]
        agent = self._agents.get(agent_id)
        if agent is None:
            return
        agent.connected = False
        inst = self._instances.get(agent.instance_id)
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

    async def refresh(self, now: float) -> None:
        """Derive every instance's state at `now` from the facts; persist and
        publish changes."""
        self.expire_idle_demand(now)
        for inst in list(self._instances.values()):
            facts = instance_facts(
                inst,
                agent_of(inst, self._agents),
                self._catalog.get(inst.model),
                now,
                started_at=self._started_at,
                agent_stale_after_s=self._timings.agent_stale_after_s,
                reconnect_grace_s=self._timings.reconnect_grace_s,
            )
            state, reason = next_state(inst, facts, self._started_at)
            if state is inst.state and (reason == inst.reason or not reason):
                continue
            if state is InstanceState.READY and inst.state is not InstanceState.READY:
                inst.ready_at = now
            if state is InstanceState.FAILED and inst.state is not InstanceState.FAILED:
                self._failures[inst.model] = self._failures.get(inst.model, 0) + 1
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
        instance_id: str,
        phase: LauncherPhase,
        reason: str,
        expected_start: float | None = None,
        ends_at: float | None = None,
    ) -> None:
        """What its launcher saw of the instance's process or job (not stored)."""
        inst = self._instances[instance_id]
        inst.launcher_phase, inst.launcher_reason = phase, reason
        inst.launcher_expected_start, inst.launcher_ends_at = expected_start, ends_at

    # --- routes ------------------------------------------------------------------------------

    def routes(self) -> list[ModelRoute]:
        return build_routes(self._catalog.models, list(self._instances.values()), self._clock())

    def instance_capabilities(self, instance_id: str) -> Capabilities | None:
        """What an instance can do: its agent's word, the catalog's declared
        capabilities on top; None when neither says anything yet."""
        inst = self._instances.get(instance_id)
        if inst is None:
            return None
        agent = agent_of(inst, self._agents)
        reported = agent.capabilities if agent is not None else None
        spec = self._catalog.get(inst.model)
        if spec is None or spec.capabilities is None:
            return reported
        return spec.capabilities.over(reported, spec.engine.value)

    def model_capabilities(
        self, model: str, ready: Sequence[str] | None = None
    ) -> Capabilities | None:
        """What a model can do: the union of its READY instances' (`ready`, their
        ids, when the caller has them), else what one of its instances last
        said, the catalog's declarations on top."""
        if ready is None:
            ready = [i.id for i in self._instances_of(model) if i.state is InstanceState.READY]
        known_caps = [c for i in ready if (c := self.instance_capabilities(i)) is not None]
        known = union_of(known_caps) if known_caps else self._last_capabilities.get(model)
        spec = self._catalog.get(model)
        if spec is None or spec.capabilities is None:
            return known
        return spec.capabilities.over(known, spec.engine.value)

    def route_capabilities(
        self, route: ModelRoute
    ) -> tuple[Capabilities | None, dict[str, Capabilities | None]]:
        """What a route's model and each of its endpoints can do."""
        per_instance = {e.instance_id: self.instance_capabilities(e.instance_id)
                        for e in route.endpoints}  # fmt: skip
        return self.model_capabilities(route.summary.spec.name, list(per_instance)), per_instance

    async def _publish_if_changed(self, now: float) -> None:
        routes = build_routes(self._catalog.models, list(self._instances.values()), now)
        # What facades see includes what each instance can do.
        signature = (route_signature(routes), [self.route_capabilities(r) for r in routes])
        if signature == self._route_signature:
            return
        self._route_signature = signature
        async with self._routes_changed:
            self._route_version += 1
            self._routes_changed.notify_all()

    async def wait_for_routes(self, seen_version: int, timeout: float) -> int:
        """Wait until the route version passes `seen_version` (or the timeout)."""
        async with self._routes_changed:
            try:
                await asyncio.wait_for(
                    self._routes_changed.wait_for(lambda: self._route_version > seen_version),
                    timeout,
                )
            except TimeoutError:
                pass
            return self._route_version
