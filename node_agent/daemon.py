"""The agent's life: start the engine, serve, report, drain on SIGTERM, stop.

start engine ─▶ serve InferenceService ─▶ register ─▶ READY when healthy
SIGTERM or DrainCommand ─▶ refuse new requests ─▶ in-flight finish ─▶
final report, leave the Session ─▶ stop engine ─▶ exit
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from collections.abc import Iterable

import grpc
from prometheus_client.core import Metric

from kscope.v1 import agent_pb2, inference_pb2, inference_pb2_grpc
from kscope_common.capabilities import Capabilities
from kscope_common.grpc_server import SERVER_OPTIONS, add_health_and_reflection, bind, mark_serving
from kscope_common.metrics import MetricsServer, counter, gauge, maybe_serve
from kscope_common.request_stats import RequestStats
from kscope_common.tls import EnrollmentError
from node_agent import local_agents
from node_agent.capabilities import Discovery, DiscoveryError
from node_agent.controller_link import (
    AgentIdentity,
    ControllerLink,
    Orphaned,
    RegistrationRefused,
    Report,
)
from node_agent.credentials import AgentCredentials, obtain
from node_agent.engines.base import Engine, EngineUnavailable
from node_agent.engines.factory import make_discovery, make_engine
from node_agent.load import Load
from node_agent.queue import RequestQueue
from node_agent.request_life import AgentCore
from node_agent.servicer import InferenceServicer
from node_agent.settings import AgentSettings

log = logging.getLogger(__name__)

SERVICE_NAMES = [inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name]

DISCOVERY_TIMEOUT_S = 15.0
"""Learning what the engine can do must take no longer (it holds back READY)."""


def _health_problem(engine: Engine) -> str:
    """Why the engine cannot become healthy as it is configured, when it knows
    (the openai engine: an upstream certificate that does not verify); shown
    as the not-ready detail that reaches the clients' 503 answers."""
    return str(getattr(engine, "health_problem", ""))


class Agent:
    """One node agent: an engine, its gRPC server, its controller link."""

    def __init__(
        self,
        settings: AgentSettings,
        engine: Engine | None = None,
        discovery: Discovery | None = None,
    ):
        """`discovery` learns what the engine can do (default: the one for its kind)."""
        self.settings = settings
        self.engine = engine or make_engine(settings)
        self.discovery = discovery or make_discovery(settings, self.engine)
        self.capabilities: Capabilities | None = None
        """What the engine can do, once learned (reported to the controller)."""
        self.discovery_failures = 0
        self.load = Load()
        self.requests = RequestStats()
        self.requests.models[settings.served_model] = self.load.stats
        self.queue = RequestQueue(settings.queue_limits(), self.load)
        self.core = AgentCore(self.engine, self.load, self.queue)
        """Every request's life (node_agent/request_life.py), whichever way it came."""
        self.phase: agent_pb2.AgentPhase.ValueType = agent_pb2.AGENT_PHASE_STARTING
        self.detail = "engine starting"
        self._drain_requested = asyncio.Event()
        self._drain_reason = ""
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.link: ControllerLink | None = None
        self.credentials: AgentCredentials | None = None
        self.metrics_server: MetricsServer | None = None

    def _report(self) -> Report:
        limits = self.queue.limits
        return Report(
            self.phase, self.load.in_flight, self.load.queued, self.detail,
            max_concurrency=max(limits.max_concurrency, 0),
            max_queue_size=0 if limits.unlimited else limits.max_queue_size,
            totals=self.requests.totals(), queued_by_caller=self.queue.waiting_by_caller(),
            capabilities=self.capabilities,
        )  # fmt: skip

    def _metrics(self) -> Iterable[Metric]:
        """/metrics, on the metrics server's thread: plain values read, nothing locked."""
        model = (self.settings.served_model,)
        load = self.load
        yield from self.requests.families(
            "kscope_agent", "measured by the agent, from a request's arrival to the engine's end"
        )
        yield gauge("kscope_agent_in_flight_requests", "Requests the engine works on.",
                    ("model",), {model: load.in_flight})  # fmt: skip
        yield gauge("kscope_agent_queued_requests", "Requests waiting for the engine.",
                    ("model",), {model: load.queued})  # fmt: skip
        yield gauge("kscope_agent_draining", "1 while the agent drains.", ("model",),
                    {model: 1 if load.draining else 0})  # fmt: skip
        yield counter("kscope_agent_capability_discovery_failures",
                      "Times the engine did not say what it can do.", ("model",),
                      {model: self.discovery_failures})  # fmt: skip

    def _set_phase(self, phase: agent_pb2.AgentPhase.ValueType, detail: str) -> None:
        if (phase, detail) != (self.phase, self.detail):
            log.info("phase %s: %s", agent_pb2.AgentPhase.Name(phase), detail)
            self.phase, self.detail = phase, detail
            if self.link is not None:
                self.link.report_now.set()

    def request_drain(self, reason: str) -> None:
        if not self._drain_requested.is_set():
            self._drain_reason = reason
            self._drain_requested.set()

    async def start(self, credentials: AgentCredentials) -> None:
        """Serve InferenceService (mutual TLS: facades only), then start the engine."""
        self.credentials = credentials
        self.server = grpc.aio.server(
            options=SERVER_OPTIONS, interceptors=[credentials.interceptor()]
        )
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(
            InferenceServicer(self.engine, self.load, self.queue), self.server
        )
        health = add_health_and_reflection(self.server, SERVICE_NAMES)
        cert = credentials.certificate
        self.port = bind(
            self.server, self.settings.bind_host(), self.settings.port,
            cert.server_credentials() if cert is not None else None,
        )  # fmt: skip
        await self.server.start()
        await mark_serving(health, SERVICE_NAMES)
        credentials.start_renewing()
        await self.engine.start()

    def advertised_address(self) -> str:
        host = self.settings.advertise_host or self.settings.host
        if host == "@node":
            host = socket.getfqdn()
        if host in ("0.0.0.0", "::"):
            host = socket.getfqdn()
        return f"{host}:{self.port}"

    async def _watch_engine(self) -> None:
        """Follow the engine's health: STARTING until healthy, READY while healthy,
        FAILED when it died or never came up."""
        started = time.monotonic()
        failures = 0
        said_problem = False
        while True:
            failure = self.engine.failure()
            if failure:
                self._set_phase(agent_pb2.AGENT_PHASE_FAILED, failure)
                return
            ok = await self.engine.healthy()
            if self.phase == agent_pb2.AGENT_PHASE_DRAINING:
                return
            if ok and self.phase != agent_pb2.AGENT_PHASE_READY and self.capabilities is None:
                # READY goes out with what the engine can do, so the facades
                # never route to an instance they know nothing of.
                await self.learn_capabilities()
            if ok:
                failures = 0
                self._set_phase(agent_pb2.AGENT_PHASE_READY, "engine healthy")
            elif self.phase == agent_pb2.AGENT_PHASE_READY:
                failures += 1
                if failures >= 3:  # one slow health answer under load is not a failure
                    self._set_phase(
                        agent_pb2.AGENT_PHASE_STARTING, "engine stopped answering health"
                    )
            elif time.monotonic() - started > self.settings.engine_startup_timeout_s:
                problem = _health_problem(self.engine)
                self._set_phase(agent_pb2.AGENT_PHASE_FAILED, "engine never became healthy"
                                + (f": {problem}" if problem else ""))  # fmt: skip
                return
            elif (problem := _health_problem(self.engine)) or said_problem:
                self._set_phase(agent_pb2.AGENT_PHASE_STARTING, problem or "engine starting")
                said_problem = bool(problem)
            ready = self.phase == agent_pb2.AGENT_PHASE_READY
            await asyncio.sleep(self.settings.health_interval_s if ready else 0.5)

    async def learn_capabilities(self) -> None:
        """Ask the engine what it can do; tell the controller when that changed.
        A failure keeps what was known (logged and counted): the facades then
        refuse nothing the agent could not confirm."""
        if self.discovery is None:
            return
        try:
            learned = await asyncio.wait_for(self.discovery.discover(), DISCOVERY_TIMEOUT_S)
        except (DiscoveryError, TimeoutError) as exc:
            self.discovery_failures += 1
            log.warning("model %s: could not learn what the engine can do: %s",
                        self.settings.served_model, exc)  # fmt: skip
            return
        if learned != self.capabilities:
            log.info("model %s: the engine can do %s", self.settings.served_model, learned)
            self.capabilities = learned
            if self.link is not None:
                self.link.report_now.set()

    async def _refresh_capabilities(self) -> None:
        """Ask again now and then while ready: LoRA adapters come and go at run time."""
        while True:
            await asyncio.sleep(self.settings.capabilities_refresh_s)
            if self.phase == agent_pb2.AGENT_PHASE_READY:
                await self.learn_capabilities()

    async def run(self, in_process: bool = False) -> int:
        """Serve until drained; return the process exit code. `in_process`: this
        agent shares its process (node_agent/in_process.py): the process's
        signals and environment are not its own, and the facade of the process
        may call it directly (node_agent/local_agents.py). However it ends —
        drained, failed, or cancelled — its engine, server and link end too."""
        if not in_process:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_drain, f"received {sig.name}")
        credentials: AgentCredentials | None = None
        try:
            token = self.settings.enroll_token.get_secret_value()
            credentials = await obtain(self.settings, token, scrub=not in_process)
            return await self._serve(credentials, in_process)
        except EnrollmentError as exc:
            log.error("%s", exc)
            return 3
        finally:
            local_agents.withdraw(self.settings.instance_id, self.core)
            await self._close(credentials)

    async def _serve(self, credentials: AgentCredentials, in_process: bool) -> int:
        try:
            await self.start(credentials)
        except EngineUnavailable as exc:
            log.error("%s", exc.message)
            return 1
        self.link = link = ControllerLink(
            credentials.controller,
            AgentIdentity(
                instance_id=self.settings.instance_id,
                address=self.advertised_address(),
                models=[self.settings.served_model],
                engine=self.engine.kind,
                engine_url=self.engine.url,
            ),
            self._report,
            self.request_drain,
            on_revoked=credentials.on_revoked,
            orphan_timeout_s=self.settings.agent_orphan_timeout_s,
        )
        log.info("serving InferenceService on %s", self.advertised_address())
        if in_process:
            local_agents.publish(self.settings.instance_id, self.advertised_address(), self.core)
        self.metrics_server = maybe_serve(
            self._metrics, self.settings.bind_host(), self.settings.metrics_port,
            self.settings.metrics_port_file,
        )  # fmt: skip
        link_task = asyncio.create_task(link.run(), name="controller-link")
        helpers = (
            asyncio.create_task(self._watch_engine(), name="engine-watch"),
            asyncio.create_task(self._refresh_capabilities(), name="capabilities"),
        )
        drain_wait = asyncio.create_task(self._drain_requested.wait())
        try:
            await asyncio.wait({link_task, drain_wait}, return_when=asyncio.FIRST_COMPLETED)
            exit_code = 0
            if link_task.done() and not drain_wait.done():
                failure = link_task.exception()
                if isinstance(failure, RegistrationRefused):
                    log.error("the controller refused this agent: %s", failure)
                    exit_code = 3
                elif isinstance(failure, Orphaned):
                    log.error("orphaned: %s; draining and exiting with the engine", failure)
                    exit_code = 4
                self._drain_reason = "lost the controller for good"
            await self._drain()
            return exit_code
        finally:
            for task in (*helpers, drain_wait):
                task.cancel()
            link.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(link_task, 5)

    async def _close(self, credentials: AgentCredentials | None) -> None:
        """Stop what run() started (each part only if it was)."""
        await self.engine.stop()
        if self.discovery is not None:
            await self.discovery.close()
        if self.server is not None:
            await self.server.stop(1)
        if credentials is not None:
            await credentials.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        log.info("agent stopped")

    async def _drain(self) -> None:
        log.info("draining: %s", self._drain_reason or "requested")
        self.load.draining = True
        self._set_phase(agent_pb2.AGENT_PHASE_DRAINING, self._drain_reason or "draining")
        deadline = time.monotonic() + self.settings.drain_timeout_s
        # Queued requests were accepted too: they are served before the agent leaves.
        while self.load.in_flight + self.load.queued > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.load.in_flight + self.load.queued:
            log.warning("drain timed out with %d requests in flight and %d queued",
                        self.load.in_flight, self.load.queued)  # fmt: skip
