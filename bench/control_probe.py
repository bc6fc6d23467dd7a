"""What bench/control.py measures with: simulated facades and one probe host.

- `Facades`: M simulated facades, each on its own channel (its own connection),
  each holding the RPC a facade watches routes with (ControlService.WatchRoutes,
  as facade/routing.py's RouteWatcher) and noting when each instance first
  appears among a model's endpoints.
- `ProbeHost`: one host agent that offers the probe models and no others. When
  the controller's host launcher asks it to load one (LoadModelCommand on its
  Session), it reports the instance running at once and starts that instance's
  simulated agent, which registers, opens its Session and reports READY. The
  moment that READY report is written is when the instance "turns READY".

Propagation = (the last facade saw the endpoint) - (READY written), for the
first instance of each probe model that every facade saw. All of it runs in
the orchestrator's process and uses time.monotonic().
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from kscope.v1 import agent_pb2, agent_pb2_grpc, control_pb2, control_pb2_grpc
from kscope_common.grpc_server import CHANNEL_OPTIONS

CALL_TIMEOUT_S = 5.0
PROBE_ADDRESS = "probe-host.bench:1"


def own_channel(target: str, name: str) -> grpc.aio.Channel:
    """A channel with its own connection (grpc would share one between channels
    with the same target and arguments)."""
    options: list[tuple[str, int | str]] = [
        *CHANNEL_OPTIONS,
        ("grpc.use_local_subchannel_pool", 1),
        ("kscope.bench.channel", name),
    ]
    return grpc.aio.insecure_channel(target, options=options)


@dataclass
class Routed:
    """The first instance of a model that every facade had among its routes."""

    instance_id: str = ""
    at: float = 0.0
    """When the last facade first saw it."""
    event: asyncio.Event = field(default_factory=asyncio.Event)


class Facades:
    """M simulated facades watching routes."""

    def __init__(self, target: str, count: int):
        self._channels = [own_channel(target, f"facade-{i}") for i in range(count)]
        self._seen: dict[str, list[float | None]] = {}
        """Instance id -> when each facade first had it."""
        self._routed: dict[str, Routed] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.updates = 0
        """Route tables received, all facades together."""
        self._connected = [asyncio.Event() for _ in self._channels]

    @property
    def count(self) -> int:
        return len(self._channels)

    @property
    def control(self) -> control_pb2_grpc.ControlServiceAsyncStub:
        """Facade 0's stub: a facade calls EnsureModel on its controller channel."""
        return control_pb2_grpc.ControlServiceStub(self._channels[0])

    async def start(self, timeout_s: float) -> None:
        self._tasks = [asyncio.create_task(self._watch(i)) for i in range(len(self._channels))]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in self._connected)), timeout_s)

    async def _watch(self, index: int) -> None:
        stub = control_pb2_grpc.ControlServiceStub(self._channels[index])
        async for update in stub.WatchRoutes(control_pb2.WatchRoutesRequest()):
            now = time.monotonic()
            self.updates += 1
            self._connected[index].set()
            # What RouteTable.apply does first: walk every route's endpoints.
            for route in update.routes:
                for endpoint in route.endpoints:
                    self._saw(route.model.name, endpoint.instance_id, index, now)

    def _saw(self, model: str, instance_id: str, index: int, now: float) -> None:
        seen = self._seen.setdefault(instance_id, [None] * len(self._channels))
        if seen[index] is not None:
            return
        seen[index] = now
        routed = self._routed.setdefault(model, Routed())
        if not routed.instance_id and all(t is not None for t in seen):
            routed.instance_id, routed.at = instance_id, now
            routed.event.set()

    async def first_routed(self, model: str, timeout_s: float) -> Routed:
        """The first instance of `model` in every facade's routes (waits for it)."""
        routed = self._routed.setdefault(model, Routed())
        await asyncio.wait_for(routed.event.wait(), timeout_s)
        return routed

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for channel in self._channels:
            await channel.close(None)


Outgoing = tuple[agent_pb2.SessionRequest, Callable[[], None] | None]
"""A message for a Session, and what to call just before grpc.aio takes it."""


async def outgoing(queue: asyncio.Queue[Outgoing]) -> AsyncIterator[agent_pb2.SessionRequest]:
    """A Session's request iterator, fed from `queue` (node_agent does the same)."""
    while True:
        message, on_send = await queue.get()
        if on_send is not None:
            on_send()
        yield message


class ProbeHost:
    """A host agent offering `models`; loads each into a simulated instance agent."""

    def __init__(self, target: str, models: list[str]):
        self._channel = own_channel(target, "probe")
        self._stub = agent_pb2_grpc.AgentServiceStub(self._channel)
        self._models = models
        self._hosted: list[agent_pb2.HostedInstance] = []
        self._outbox: asyncio.Queue[Outgoing] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self.ready_at: dict[str, float] = {}
        """Instance id -> when its agent's READY report was handed to grpc.aio."""
        self.launched: dict[str, list[str]] = {}
        """Model -> the instances the controller asked this host to load, in order
        (more than one when it failed an instance and launched another)."""
        self.failures: list[str] = []
        self._interval_s = 1.0

    async def start(self) -> None:
        reply = await self._stub.Register(
            agent_pb2.RegisterRequest(
                address=PROBE_ADDRESS, hostname="probe-host", models=self._models,
                engine="mlx_vlm", pid=os.getpid(), host_agent=True, memory_bytes=1 << 40,
            ),
            timeout=CALL_TIMEOUT_S,
        )  # fmt: skip
        self._interval_s = max(0.05, reply.report_interval_ms / 1000)
        hello = agent_pb2.SessionRequest(hello=agent_pb2.SessionHello(agent_id=reply.agent_id))
        self._outbox.put_nowait((hello, None))
        self._report()
        opened = asyncio.get_running_loop().create_future()
        self._tasks.append(asyncio.create_task(self._session(opened)))
        self._tasks.append(asyncio.create_task(self._keep_reporting()))
        await asyncio.wait_for(opened, CALL_TIMEOUT_S)

    def _report(self) -> None:
        report = agent_pb2.LoadReport(
            phase=agent_pb2.AGENT_PHASE_READY,
            detail=f"{len(self._hosted)} instances running",
            hosted=self._hosted,
        )
        self._outbox.put_nowait((agent_pb2.SessionRequest(load_report=report), None))

    async def _keep_reporting(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            self._report()

    async def _session(self, opened: asyncio.Future[None]) -> None:
        try:
            async for command in self._stub.Session(outgoing(self._outbox)):
                if not opened.done():
                    opened.set_result(None)  # the revoked list: the session is open
                if command.WhichOneof("command") == "load_model":
                    self._load(command.load_model)
        except grpc.aio.AioRpcError as exc:
            self.failures.append(f"probe host: {exc.code().name} {exc.details()}")
            if not opened.done():
                opened.set_exception(exc)

    def _load(self, load: agent_pb2.LoadModelCommand) -> None:
        """What node_agent/host.py does: note the instance, report at once, start
        the instance's agent."""
        self._hosted.append(agent_pb2.HostedInstance(instance_id=load.instance_id, running=True))
        self._report()
        self._tasks.append(asyncio.create_task(self._instance(load.instance_id)))
        self.launched.setdefault(load.model, []).append(load.instance_id)

    async def _instance(self, instance_id: str) -> None:
        """The instance's own agent: register, open the Session, report READY."""
        try:
            reply = await self._stub.Register(
                agent_pb2.RegisterRequest(
                    instance_id=instance_id, address=f"{instance_id}.bench:1",
                    hostname="probe-host", engine="mlx_vlm", pid=os.getpid(),
                ),
                timeout=CALL_TIMEOUT_S,
            )  # fmt: skip
            outbox: asyncio.Queue[Outgoing] = asyncio.Queue()
            hello = agent_pb2.SessionRequest(hello=agent_pb2.SessionHello(agent_id=reply.agent_id))
            ready = agent_pb2.SessionRequest(
                load_report=agent_pb2.LoadReport(phase=agent_pb2.AGENT_PHASE_READY)
            )
            outbox.put_nowait((hello, None))

            def note_ready() -> None:
                self.ready_at.setdefault(instance_id, time.monotonic())

            async for _command in self._stub.Session(outgoing(outbox)):
                # The first command (the revoked list) says the session is open:
                # the agent counts as connected; now it turns READY.
                if instance_id not in self.ready_at:
                    outbox.put_nowait((ready, note_ready))
                    self._tasks.append(asyncio.create_task(self._stay_ready(outbox, ready)))
        except grpc.aio.AioRpcError as exc:
            self.failures.append(f"instance {instance_id}: {exc.code().name} {exc.details()}")

    async def _stay_ready(
        self, outbox: asyncio.Queue[Outgoing], ready: agent_pb2.SessionRequest
    ) -> None:
        while True:  # a silent agent goes stale
            await asyncio.sleep(self._interval_s)
            outbox.put_nowait((ready, None))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._channel.close(None)
