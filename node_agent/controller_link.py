"""The agent's link to the controller: register, keep a Session, obey commands.

The link survives controller restarts: a broken Session is re-established
with a short capped backoff, so an agent is attached again within seconds. The
token path never depends on it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field

import grpc

from kscope.v1 import agent_pb2, agent_pb2_grpc
from kscope_common.capabilities import Capabilities
from kscope_common.request_stats import RequestTotals
from kscope_common.retry import RECONNECT, Backoff
from kscope_common.tls import ControllerConnection

log = logging.getLogger(__name__)

_PERMANENT = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.INVALID_ARGUMENT,
}


class RegistrationRefused(Exception):
    """The controller will never take this agent (bad token, ended instance)."""


class Orphaned(Exception):
    """No controller answered for the orphan timeout: nobody will route to or
    stop this agent any more."""


@dataclass(frozen=True)
class AgentIdentity:
    instance_id: str
    address: str
    models: list[str]
    engine: str
    engine_url: str
    host_agent: bool = False
    """No instance of its own: it loads the models it offers when asked."""
    memory_bytes: int = 0


@dataclass(frozen=True)
class Report:
    phase: agent_pb2.AgentPhase.ValueType
    in_flight: int
    queued: int
    detail: str
    max_concurrency: int = 0
    """0: no limit."""
    max_queue_size: int = 0
    totals: RequestTotals = field(default_factory=RequestTotals)
    """The requests that ended since the agent started."""
    hosted: tuple[agent_pb2.HostedInstance, ...] = ()
    """A host agent's instances."""
    queued_by_caller: dict[str, int] = field(default_factory=dict)
    """Waiting requests per caller (the key's owner), for /v1/queue/stats."""
    capabilities: Capabilities | None = None
    """What the instance can do; None until the agent learned it."""

    def to_proto(self, with_capabilities: bool = False) -> agent_pb2.LoadReport:
        """The report; `with_capabilities`: with them (sent only when they changed)."""
        report = agent_pb2.LoadReport(
            phase=self.phase, in_flight=self.in_flight, queued=self.queued, detail=self.detail,
            max_concurrency=self.max_concurrency, max_queue_size=self.max_queue_size,
            hosted=self.hosted, queued_by_caller=self.queued_by_caller, **asdict(self.totals),
        )  # fmt: skip
        if with_capabilities and self.capabilities is not None:
            report.capabilities.CopyFrom(self.capabilities.to_proto())
        return report


class ControllerLink:
    """Keeps the agent registered; calls `on_drain` when the controller says so,
    and `on_command` with any other command (a host agent's load and unload)."""

    def __init__(
        self,
        controller: ControllerConnection,
        identity: AgentIdentity,
        current_report: Callable[[], Report],
        on_drain: Callable[[str], None],
        on_command: Callable[[agent_pb2.SessionResponse], None] | None = None,
        on_revoked: Callable[[list[str]], None] | None = None,
        orphan_timeout_s: float = 900.0,
    ):
        self._controller = controller
        self._identity = identity
        self._current_report = current_report
        self._on_drain = on_drain
        self._on_command = on_command
        self._on_revoked = on_revoked
        self._orphan_timeout_s = orphan_timeout_s
        self.report_now = asyncio.Event()
        """Set to send a report at once (a phase change)."""
        self._closing = asyncio.Event()
        self.agent_id = ""
        self._interval_s = 1.0

    async def run(self) -> None:
        """Register and hold the Session until `close`; raise RegistrationRefused
        when the controller refuses the agent for good."""
        backoff = Backoff(RECONNECT)
        lost_since = time.monotonic()  # not attached yet
        while not self._closing.is_set():
            # A fresh channel after a renewal or a move; otherwise the same one.
            stub = agent_pb2_grpc.AgentServiceStub(self._controller.channel())
            registered = False
            try:
                await self._register(stub)
                registered = True
                backoff.reset()
                await self._session(stub)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _PERMANENT:
                    raise RegistrationRefused(exc.details() or exc.code().name) from exc
                log.warning("controller link: %s: %s", exc.code().name, exc.details())
                if exc.code() is grpc.StatusCode.UNAVAILABLE:
                    # A restarted controller may listen for agents on another port.
                    await self._controller.rediscover()
            if registered:
                lost_since = time.monotonic()  # the controller was there until now
            if self._closing.is_set():
                return
            alone_s = time.monotonic() - lost_since
            if alone_s > self._orphan_timeout_s:
                raise Orphaned(f"no controller for {alone_s:.0f} s")
            try:
                await asyncio.wait_for(self._closing.wait(), backoff.next_delay())
            except TimeoutError:
                pass

    async def _register(self, stub: agent_pb2_grpc.AgentServiceAsyncStub) -> None:
        ident = self._identity
        capabilities = self._current_report().capabilities
        response = await stub.Register(
            agent_pb2.RegisterRequest(
                instance_id=ident.instance_id,
                address=ident.address,
                hostname=socket.gethostname(),
                models=ident.models,
                engine=ident.engine,
                engine_url=ident.engine_url,
                pid=os.getpid(),
                host_agent=ident.host_agent,
                memory_bytes=ident.memory_bytes,
                capabilities=capabilities.to_proto() if capabilities is not None else None,
            ),
            timeout=5,
        )
        self.agent_id = response.agent_id
        self._interval_s = max(0.05, response.report_interval_ms / 1000)
        log.info("registered with %s as %s", self._controller.mesh_address, self.agent_id)

    async def _outgoing(self) -> AsyncIterator[agent_pb2.SessionRequest]:
        yield agent_pb2.SessionRequest(hello=agent_pb2.SessionHello(agent_id=self.agent_id))
        told: Capabilities | None = None  # what this Session heard of the capabilities
        while not self._closing.is_set():
            report = self._current_report()
            changed = report.capabilities is not None and report.capabilities != told
            told = report.capabilities if changed else told
            yield agent_pb2.SessionRequest(load_report=report.to_proto(with_capabilities=changed))
            self.report_now.clear()
            wake = asyncio.ensure_future(self.report_now.wait())
            closing = asyncio.ensure_future(self._closing.wait())
            await asyncio.wait({wake, closing}, timeout=self._interval_s,
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            wake.cancel()
            closing.cancel()
        # A last report, so the controller sees the final phase before we leave.
        yield agent_pb2.SessionRequest(load_report=self._current_report().to_proto())

    async def _session(self, stub: agent_pb2_grpc.AgentServiceAsyncStub) -> None:
        call = stub.Session(self._outgoing())
        async for command in call:
            kind = command.WhichOneof("command")
            if kind == "drain":
                log.info("controller asks to drain: %s", command.drain.reason)
                self._on_drain(command.drain.reason)
            elif kind == "revoked":
                if self._on_revoked is not None:
                    self._on_revoked(list(command.revoked.enrollment_ids))
            elif self._on_command is not None:
                self._on_command(command)
            else:
                log.warning("ignoring a %s command: this agent does not take it", kind)
        log.info("session with the controller ended")

    def close(self) -> None:
        """End the Session cleanly (after a final report) and stop reconnecting."""
        self._closing.set()
