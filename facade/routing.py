"""The facade's route table: which agents serve which model, and which to pick.

The controller pushes the table (WatchRoutes); the facade never asks per
request. Among a model's READY instances it picks the one with the fewest
requests outstanding from this facade.

Clients name a model by its catalog name, by one of its aliases, or by one
of its LoRA adapters (`RouteTable.names`): an alias routes to the model's
instances; an adapter to those of its instances that have it loaded (or that
have not said yet what they serve). Given a `Requirement`
(facade/capabilities.py), `pick` skips instances that cannot serve the request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from facade.capabilities import Requirement
from facade.exchange import AgentSession
from kscope.v1 import control_pb2, control_pb2_grpc, inference_pb2_grpc
from kscope_common.capabilities import Capabilities
from kscope_common.grpc_server import CHANNEL_OPTIONS
from kscope_common.retry import RECONNECT, Backoff
from kscope_common.tls import ControllerConnection
from node_agent import local_agents
from node_agent.request_life import AgentCore

log = logging.getLogger(__name__)

MODEL_STATE_NAMES = {
    control_pb2.MODEL_STATE_COLD: "cold",
    control_pb2.MODEL_STATE_STARTING: "starting",
    control_pb2.MODEL_STATE_READY: "ready",
}


@dataclass
class Target:
    """One READY instance and the facade's channel to its agent."""

    instance_id: str
    address: str
    channel: grpc.aio.Channel
    """Its own: TLS checks this instance's certificate on it."""
    stub: inference_pb2_grpc.InferenceServiceAsyncStub
    session: AgentSession
    """The shared Multiplex stream to this agent."""
    outstanding: int = 0
    suspect_until: float = 0.0
    """After a transport failure, avoid this target briefly until the
    controller's next table says whether it is still READY."""
    capabilities: Capabilities | None = None
    """What this instance can do, as the latest table says; None: not known."""
    local: AgentCore | None = None
    """The agent runs in this process (`kscope serve`): its request life,
    called directly instead of over `channel` (facade/local_exchange.py)."""


@dataclass
class ModelEntry:
    info: control_pb2.Model
    retry_after_s: int
    targets: list[Target] = field(default_factory=list)
    capabilities: Capabilities | None = None
    """What the model can do (any of its instances); None: not known."""
    parent: str = ""
    """For a LoRA adapter: the model it adapts."""
    alias_of: str = ""
    """For an alias: the model it names."""
    uniform: bool = True
    """Every target can do the same: any of them serves what the model can."""

    @property
    def state(self) -> str:
        return MODEL_STATE_NAMES.get(self.info.state, "unknown")


def _capabilities(message: control_pb2.Model | control_pb2.Endpoint) -> Capabilities | None:
    if not message.HasField("capabilities"):
        return None
    return Capabilities.from_proto(message.capabilities)


def _uniform(targets: list[Target]) -> bool:
    return all(t.capabilities == targets[0].capabilities for t in targets[1:])


def _adapter_entry(name: str, base: ModelEntry, declared: bool) -> ModelEntry:
    """The entry of LoRA adapter `name` of `base`: the instances that have it
    loaded; those that have not said what they serve too, when the catalog
    lists the adapter (every instance is started with the catalog's adapters)."""
    targets = [
        t
        for t in base.targets
        if (t.capabilities is None and declared)
        or (t.capabilities is not None and any(a == name for a, _ in t.capabilities.lora_adapters))
    ]
    info = control_pb2.Model()
    info.CopyFrom(base.info)
    info.name = name
    info.ClearField("aliases")
    info.ClearField("lora_adapters")
    info.ready_replicas = len(targets)
    if not targets and info.state == control_pb2.MODEL_STATE_READY:
        info.state = control_pb2.MODEL_STATE_STARTING
        info.state_message = f"no ready instance of {base.info.name!r} has {name!r} loaded"
    elif targets:
        info.state = control_pb2.MODEL_STATE_READY
    return ModelEntry(
        info, base.retry_after_s, targets, base.capabilities, parent=base.info.name,
        uniform=_uniform(targets),
    )  # fmt: skip


def _plaintext_dial(address: str, _instance_id: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


class RouteTable:
    """Models and their targets; swapped whole on every push from the controller."""

    def __init__(self, dial: Callable[[str, str], grpc.aio.Channel] | None = None) -> None:
        """`dial(address, instance_id)` opens a channel to an agent (plaintext
        when not given: tests of the table alone)."""
        self.dial = dial or _plaintext_dial
        self.models: dict[str, ModelEntry] = {}
        """The catalog's models, by name."""
        self.names: dict[str, ModelEntry] = {}
        """Every name a client may use: the models, their aliases, their LoRA adapters."""
        self.version = -1
        self.received = asyncio.Event()
        self.updated = asyncio.Event()
        """Set (and replaced by a fresh one) on every update: requests waiting for
        a cold model wait on the current one."""
        self._targets: dict[str, Target] = {}
        self._retiring: set[asyncio.Task[None]] = set()

    def apply(self, update: control_pb2.WatchRoutesResponse) -> None:
        models: dict[str, ModelEntry] = {}
        live: set[str] = set()
        for route in update.routes:
            entry = ModelEntry(route.model, route.retry_after_seconds)
            entry.capabilities = _capabilities(route.model)
            for ep in route.endpoints:
                target = self._target(ep.instance_id, ep.address)
                target.capabilities = _capabilities(ep)
                entry.targets.append(target)
                live.add(ep.instance_id)
            entry.uniform = _uniform(entry.targets)
            models[route.model.name] = entry
        self.models = models
        self.names = self._names(models)
        self.version = update.version
        for instance_id in list(self._targets):
            if instance_id not in live:
                self._drop(instance_id)
        self.received.set()
        updated, self.updated = self.updated, asyncio.Event()
        updated.set()

    @staticmethod
    def _names(models: dict[str, ModelEntry]) -> dict[str, ModelEntry]:
        """Every model under its name, its aliases and its adapters' names."""
        names = dict(models)
        for name, entry in models.items():
            for alias in entry.info.aliases:
                names.setdefault(alias, ModelEntry(
                    entry.info, entry.retry_after_s, list(entry.targets), entry.capabilities,
                    alias_of=name, uniform=entry.uniform,
                ))  # fmt: skip
            declared = set(entry.info.lora_adapters)
            loaded = {a for t in entry.targets if t.capabilities
                      for a, _ in t.capabilities.lora_adapters}  # fmt: skip
            for adapter in sorted(declared | loaded):
                names.setdefault(adapter, _adapter_entry(adapter, entry, adapter in declared))
        return names

    def _target(self, instance_id: str, address: str) -> Target:
        target = self._targets.get(instance_id)
        if target is not None and target.address == address:
            target.suspect_until = 0.0
            return target
        if target is not None:
            self._retire(target)
        return self._connect(instance_id, address)

    def _connect(self, instance_id: str, address: str) -> Target:
        channel = self.dial(address, instance_id)
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        target = Target(
            instance_id, address, channel, stub, AgentSession(stub, address),
            local=local_agents.local_agent(instance_id, address),
        )  # fmt: skip
        self._targets[instance_id] = target
        return target

    def _drop(self, instance_id: str) -> None:
        self._retire(self._targets.pop(instance_id))

    def _retire(self, target: Target) -> None:
        """Close a target's channel once its requests are done (they finish on
        their own; a new request never picks it again)."""

        async def close_when_idle() -> None:
            while target.outstanding or not target.session.idle:
                await asyncio.sleep(1.0)
            await target.session.close()
            await target.channel.close(None)

        task = asyncio.ensure_future(close_when_idle())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def redial(self) -> None:
        """New channels for every target (this facade's certificate was
        renewed): new requests use them, open streams finish on the old ones."""
        for entry in self.names.values():  # the models' entries, and their names'
            entry.targets = [self._target_anew(t) for t in entry.targets]

    def _target_anew(self, old: Target) -> Target:
        current = self._targets.get(old.instance_id)
        if current is not old:
            return current or old
        self._retire(old)
        fresh = self._connect(old.instance_id, old.address)
        fresh.capabilities = old.capabilities  # until the next routes, which set them anew
        return fresh

    def pick(
        self, model: str, avoid: Target | None = None, requirement: Requirement | None = None
    ) -> Target | None:
        """The least-loaded usable target of `model` (any name clients use), or
        None. With a `requirement`, only targets that can meet it (when the
        model's targets differ; when they are alike, the model's own check,
        facade/capabilities.py `refusal`, already said they can)."""
        entry = self.names.get(model)
        if entry is None or not entry.targets:
            return None
        now = time.monotonic()
        best: Target | None = None
        check = None if entry.uniform else requirement
        for target in entry.targets:
            if target is avoid or target.suspect_until > now:
                continue
            if check is not None and not check.met_by(target.capabilities):
                continue
            if best is None or target.outstanding < best.outstanding:
                best = target
        return best

    def capabilities(self, model: str) -> Capabilities | None:
        """What `model` (any name clients use) can do; None: unknown name, or not known."""
        entry = self.names.get(model)
        return entry.capabilities if entry is not None else None

    async def close(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        for target in self._targets.values():
            await target.session.close()
            await target.channel.close(None)
        self._targets.clear()


class RouteWatcher:
    """Keeps a RouteTable current from the controller's WatchRoutes stream and
    offers EnsureModel; reconnects with backoff, keeping the last table meanwhile."""

    def __init__(self, controller: ControllerConnection, table: RouteTable):
        self._controller = controller
        self._table = table
        self.connected = False

    @property
    def _stub(self) -> control_pb2_grpc.ControlServiceAsyncStub:
        # The current channel: a renewal or a controller move makes a new one.
        return control_pb2_grpc.ControlServiceStub(self._controller.channel())

    async def run(self) -> None:
        backoff = Backoff(RECONNECT)
        while True:
            try:
                async for update in self._stub.WatchRoutes(control_pb2.WatchRoutesRequest()):
                    if not self.connected:
                        log.info("route stream from %s connected", self._controller.mesh_address)
                    self.connected = True
                    backoff.reset()
                    self._table.apply(update)
            except grpc.aio.AioRpcError as exc:
                if self.connected or exc.code() is not grpc.StatusCode.UNAVAILABLE:
                    log.warning("route stream lost: %s %s", exc.code().name, exc.details())
                if exc.code() is grpc.StatusCode.UNAVAILABLE:
                    await self._controller.rediscover()
            self.connected = False
            await asyncio.sleep(backoff.next_delay())

    async def ensure_model(
        self, model: str, timeout_s: float
    ) -> control_pb2.EnsureModelResponse | None:
        """Ask for capacity; None when the controller does not answer in time."""
        try:
            return await self._stub.EnsureModel(
                control_pb2.EnsureModelRequest(model=model), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("EnsureModel(%s) failed: %s %s", model, exc.code().name, exc.details())
            return None

    async def list_instances(self, timeout_s: float) -> list[control_pb2.Instance] | None:
        """The controller's live instances (with their queue figures); None when
        the controller does not answer in time."""
        try:
            reply = await self._stub.ListInstances(
                control_pb2.ListInstancesRequest(), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("ListInstances failed: %s %s", exc.code().name, exc.details())
            return None
        return list(reply.instances)

    async def telemetry(
        self, model: str, timeout_s: float, limit: int = 0
    ) -> list[control_pb2.TelemetryRecord] | None:
        """The model's own telemetry records (not its instances'), oldest first,
        the newest `limit` (0: all); None when the controller does not answer in time."""
        try:
            reply = await self._stub.GetTelemetry(
                control_pb2.GetTelemetryRequest(model=model, limit=limit),
                timeout=timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("GetTelemetry(%s) failed: %s %s", model, exc.code().name, exc.details())
            return None
        return list(reply.records)

    async def close(self) -> None:
        """The controller connection is the facade's, closed by its owner."""
