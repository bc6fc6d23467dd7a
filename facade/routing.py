"""The facade's route table: which agents serve which model, and which to pick.

The controller pushes the table (WatchRoutes); the facade never asks per
request. Among a model's READY instances it picks the one with the fewest
requests outstanding from this facade.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc

from facade.exchange import AgentSession
from kscope.v1 import control_pb2, control_pb2_grpc, inference_pb2_grpc
from kscope_common.grpc_server import CHANNEL_OPTIONS

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
    stub: inference_pb2_grpc.InferenceServiceAsyncStub
    session: AgentSession
    """The shared Multiplex stream to this agent."""
    outstanding: int = 0
    suspect_until: float = 0.0
    """After a transport failure, avoid this target briefly until the
    controller's next table says whether it is still READY."""


@dataclass
class ModelEntry:
    info: control_pb2.Model
    retry_after_s: int
    targets: list[Target] = field(default_factory=list)

    @property
    def state(self) -> str:
        return MODEL_STATE_NAMES.get(self.info.state, "unknown")


class RouteTable:
    """Models and their targets; swapped whole on every push from the controller."""

    def __init__(self) -> None:
        self.models: dict[str, ModelEntry] = {}
        self.version = -1
        self.received = asyncio.Event()
        self.updated = asyncio.Event()
        """Set (and replaced by a fresh one) on every update: requests waiting for
        a cold model wait on the current one."""
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._targets: dict[str, Target] = {}

    def apply(self, update: control_pb2.WatchRoutesResponse) -> None:
        models: dict[str, ModelEntry] = {}
        live: set[str] = set()
        for route in update.routes:
            entry = ModelEntry(route.model, route.retry_after_seconds)
            for ep in route.endpoints:
                entry.targets.append(self._target(ep.instance_id, ep.address))
                live.add(ep.instance_id)
            models[route.model.name] = entry
        self.models = models
        self.version = update.version
        for instance_id in list(self._targets):
            if instance_id not in live:
                self._drop(instance_id)
        self.received.set()
        updated, self.updated = self.updated, asyncio.Event()
        updated.set()

    def _target(self, instance_id: str, address: str) -> Target:
        target = self._targets.get(instance_id)
        if target is not None and target.address == address:
            target.suspect_until = 0.0
            return target
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            self._channels[address] = channel
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        target = Target(instance_id, address, stub, AgentSession(stub, address))
        self._targets[instance_id] = target
        return target

    def _drop(self, instance_id: str) -> None:
        target = self._targets.pop(instance_id)
        # In-flight requests finish on their own; close what they use later.
        loop = asyncio.get_running_loop()
        loop.call_later(30, lambda: asyncio.ensure_future(target.session.close()))
        if not any(t.address == target.address for t in self._targets.values()):
            channel = self._channels.pop(target.address, None)
            if channel is not None:
                loop.call_later(30, lambda: asyncio.ensure_future(channel.close(None)))

    def pick(self, model: str, avoid: Target | None = None) -> Target | None:
        """The least-loaded usable target of `model`, or None."""
        entry = self.models.get(model)
        if entry is None or not entry.targets:
            return None
        now = time.monotonic()
        best: Target | None = None
        for target in entry.targets:
            if target is avoid or target.suspect_until > now:
                continue
            if best is None or target.outstanding < best.outstanding:
                best = target
        return best

    async def close(self) -> None:
        for target in self._targets.values():
            await target.session.close()
        for channel in self._channels.values():
            await channel.close(None)
        self._channels.clear()
        self._targets.clear()


class RouteWatcher:
    """Keeps a RouteTable current from the controller's WatchRoutes stream and
    offers EnsureModel; reconnects with backoff, keeping the last table meanwhile."""

    def __init__(self, controller: str, table: RouteTable):
        self._controller = controller
        self._table = table
        self._channel = grpc.aio.insecure_channel(controller, options=CHANNEL_OPTIONS)
        self._stub = control_pb2_grpc.ControlServiceStub(self._channel)
        self.connected = False

    async def run(self) -> None:
        backoff = 0.1
        while True:
            try:
                async for update in self._stub.WatchRoutes(control_pb2.WatchRoutesRequest()):
                    if not self.connected:
                        log.info("route stream from %s connected", self._controller)
                    self.connected = True
                    backoff = 0.1
                    self._table.apply(update)
            except grpc.aio.AioRpcError as exc:
                if self.connected:
                    log.warning("route stream lost: %s %s", exc.code().name, exc.details())
            self.connected = False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

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
        await self._channel.close(None)
