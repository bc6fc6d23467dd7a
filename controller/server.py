"""Builds and runs the controller: store, fleet, launchers, control loop, gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc

from controller.adoption import adopt_jobs_when_reachable
from controller.ca import ClusterCA, load_or_create_ca
from controller.catalog import Catalog, load_catalog
from controller.control_loop import ControlLoop
from controller.enrollment import EnrollmentRegistry
from controller.executor import Executor
from controller.fleet import Fleet, FleetTimings
from controller.identity_servicer import IdentityServicer
from controller.key_servicer import KeyServicer
from controller.keys import KeyRegistry, NotAuthenticated
from controller.launchers.base import Launcher
from controller.launchers.host import HostLauncher
from controller.launchers.local import LocalLauncher
from controller.launchers.slurm import build_slurm_launcher
from controller.metrics import controller_metrics
from controller.servicers import AgentServicer, ControlServicer
from controller.settings import ControllerSettings
from controller.store.enrollments import EnrollmentStore
from controller.store.keys import KeyStore
from controller.store.sqlite import SqliteStore
from controller.store.usage import UsageStore
from controller.telemetry import Telemetry, TelemetryStore
from controller.usage import UsageLedger
from controller.usage_servicer import UsageServicer
from kscope.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    control_pb2,
    control_pb2_grpc,
    identity_pb2,
    identity_pb2_grpc,
    keys_pb2,
    keys_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
)
from kscope_common.authz import AuthzInterceptor, KeyHolder, Refusal
from kscope_common.grpc_server import (
    SERVER_OPTIONS,
    add_health_and_reflection,
    bind,
    mark_serving,
    write_port_file,
)
from kscope_common.metrics import MetricsServer, maybe_serve
from kscope_common.pki import Identity, Role

log = logging.getLogger(__name__)

SERVICE_NAMES = [
    agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
    control_pb2.DESCRIPTOR.services_by_name["ControlService"].full_name,
    keys_pb2.DESCRIPTOR.services_by_name["KeyService"].full_name,
    identity_pb2.DESCRIPTOR.services_by_name["IdentityService"].full_name,
    usage_pb2.DESCRIPTOR.services_by_name["UsageService"].full_name,
]


@dataclass
class Controller:
    """A running controller."""

    server: grpc.aio.Server
    port: int
    fleet: Fleet
    store: SqliteStore
    launchers: dict[str, Launcher]
    executor: Executor
    loop_task: asyncio.Task[None]
    settings: ControllerSettings
    keys: KeyRegistry | None = None
    admin_key: str | None = None
    """The bootstrap admin key (state_dir/admin-key) while it is usable."""
    metrics: MetricsServer | None = None
    telemetry: TelemetryStore | None = None
    mesh_port: int = 0
    """The mutual-TLS port (agents, facades); == port in plaintext mode."""
    ca: ClusterCA | None = None
    """None in plaintext mode."""
    enrollments: EnrollmentRegistry | None = None
    background: list[asyncio.Task[None]] = field(default_factory=list)
    usage: UsageLedger | None = None

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop serving; with stop_instances_on_exit, stop local instances too."""
        for task in [self.loop_task, *self.background]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.executor.wait_idle()
        for launcher in self.launchers.values():
            await launcher.close(self.settings.stop_instances_on_exit)
        await self.server.stop(grace_s)
        if self.metrics is not None:
            self.metrics.close()
        if self.telemetry is not None:
            self.telemetry.close()
        self.store.close()
        if self.keys is not None:
            self.keys.close()
        if self.usage is not None:
            self.usage.close()


async def _resolve_catalog(
    settings: ControllerSettings, store: SqliteStore, override: Catalog | None
) -> Catalog:
    if override is not None:
        catalog = override
    elif settings.catalog is not None:
        catalog = load_catalog(settings.catalog)
    else:
        return await store.load_catalog()
    await store.save_catalog(catalog)
    return catalog


def _advertise_address(settings: ControllerSettings, port: int) -> str:
    if settings.advertise_address:
        return settings.advertise_address
    host = settings.host
    if host in ("0.0.0.0", "::", "[::]"):
        host = socket.getfqdn()
    return f"{host}:{port}"


async def _gather(*work: Coroutine[Any, Any, None]) -> None:
    await asyncio.gather(*work)


def _mesh_advertise(settings: ControllerSettings, mesh_port: int) -> str:
    if settings.mesh_advertise_address:
        return settings.mesh_advertise_address
    public = _advertise_address(settings, settings.port)
    host = public.rsplit(":", 1)[0]
    mesh_host = settings.mesh_host or settings.host
    if mesh_host not in ("0.0.0.0", "::", "[::]", settings.host):
        host = mesh_host
    return f"{host}:{mesh_port}"


def _key_resolver(keys: KeyRegistry) -> Callable[[str], Awaitable[KeyHolder]]:
    async def resolve(credential: str) -> KeyHolder:
        try:
            caller = await keys.caller(credential)
        except NotAuthenticated as exc:
            raise Refusal(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from None
        return KeyHolder(caller.owner, caller.admin)

    return resolve


def _make_ca(settings: ControllerSettings) -> ClusterCA:
    names = [settings.host, settings.mesh_host, *settings.tls_server_names]
    for address in (settings.advertise_address, settings.mesh_advertise_address):
        if address:
            names.append(address.rsplit(":", 1)[0].strip("[]"))
    ca = load_or_create_ca(settings.tls_dir, settings.tls_ca_cert, settings.tls_ca_key)
    return ClusterCA(ca, settings.tls_cert_lifetime_s, names)


async def start_controller(
    settings: ControllerSettings, catalog: Catalog | None = None
) -> Controller:
    """Start a controller and return once it serves."""
    settings.state_path.mkdir(parents=True, exist_ok=True, mode=0o700)
    # A bad CA setting fails the start before anything is written.
    ca = None if settings.insecure_plaintext else _make_ca(settings)
    store = SqliteStore(settings.database_path)
    fleet = Fleet(
        store,
        await _resolve_catalog(settings, store, catalog),
        FleetTimings(
            report_interval_s=settings.report_interval_s,
            agent_stale_after_s=settings.agent_stale_after_s,
            reconnect_grace_s=settings.reconnect_grace_s,
        ),
    )
    await fleet.load()
    keys = KeyRegistry(
        KeyStore(settings.database_path),
        settings.key_default_ttl_days * 86400,
        settings.key_max_ttl_days * 86400,
    )
    admin_key = await keys.bootstrap_admin(settings.admin_key_path)

    telemetry_store = TelemetryStore(settings.database_path)
    telemetry = Telemetry(
        fleet, telemetry_store, settings.min_update_interval_seconds,
        settings.max_num_historic_records, settings.telemetry_callback_url,
    )  # fmt: skip

    plaintext = settings.insecure_plaintext
    authz = AuthzInterceptor(keys=_key_resolver(keys), plaintext=plaintext)
    enrollments: EnrollmentRegistry | None = None
    background: list[asyncio.Task[None]] = []
    if plaintext:
        log.warning(
            "KSCOPE_INSECURE_PLAINTEXT is set: the gRPC plane runs WITHOUT TLS and without "
            "identity checks on agents and facades. Anyone who reaches port %d can register "
            "agents, read routes and call agents. Use this only to debug.", settings.port,
        )  # fmt: skip
    else:
        assert ca is not None

        def revoked(ids: frozenset[str]) -> None:
            authz.revocations.replace(ids)
            fleet.set_revoked(ids)

        enrollments = EnrollmentRegistry(
            EnrollmentStore(settings.database_path), ca, fleet.instance_waiting, revoked
        )
        await enrollments.load()

    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=[authz])
    agent_pb2_grpc.add_AgentServiceServicer_to_server(AgentServicer(fleet), server)
    executors: list[Executor] = []  # the executor needs the bound port: made below
    control_servicer = ControlServicer(
        fleet, telemetry_store, lambda: list(executors[0].recent) if executors else []
    )
    control_pb2_grpc.add_ControlServiceServicer_to_server(control_servicer, server)
    keys_pb2_grpc.add_KeyServiceServicer_to_server(KeyServicer(keys), server)
    usage = UsageLedger(UsageStore(settings.database_path), settings.usage_retention_days)
    usage_pb2_grpc.add_UsageServiceServicer_to_server(UsageServicer(usage, keys), server)
    mesh: list[str] = []
    identity_pb2_grpc.add_IdentityServiceServicer_to_server(
        IdentityServicer(enrollments, ca.cert_pem if ca else b"", lambda: mesh[0]), server
    )
    health = add_health_and_reflection(server, SERVICE_NAMES)
    if ca is None:
        port = bind(server, settings.host, settings.port)
        mesh_port = port
    else:
        own = ca.issue_direct(Identity(Role.CONTROLLER, socket.gethostname()))
        background.append(asyncio.create_task(ca.keep_renewed(own), name="controller-cert"))
        # The public port: server-authenticated TLS, for enrollment and for
        # operators with an admin key. The mesh port: mutual TLS, for agents
        # and facades. One server, one authorization table for both.
        port = bind(server, settings.host, settings.port, own.server_credentials(mutual=False))
        mesh_port = bind(
            server, settings.mesh_host or settings.host, settings.mesh_port,
            own.server_credentials(mutual=True),
        )  # fmt: skip
    mesh.append(_mesh_advertise(settings, mesh_port) if ca else _advertise_address(settings, port))
    await server.start()
    await mark_serving(health, SERVICE_NAMES)

    slurm = build_slurm_launcher(settings)  # connects on first use only
    launchers: dict[str, Launcher] = {
        "local": LocalLauncher(
            settings.state_path / "logs",
            python=settings.agent_python,
            tie_to_us=settings.tie_local_agents,
            in_process=settings.in_process_agents,
        ),
        "slurm": slurm,
        "host": HostLauncher(fleet),
    }
    executor = Executor(
        fleet, launchers, _advertise_address(settings, port), enrollments,
        ca.cert_pem if ca else None,
    )  # fmt: skip
    executors.append(executor)
    control = ControlLoop(
        fleet,
        launchers,
        executor,
        interval_s=settings.reconcile_interval_s,
        drain_timeout_s=settings.drain_timeout_s,
        rotation_lead_s=settings.slurm_rotation_lead_s,
    )
    # Matching SLURM's queue with the stored instances runs beside the loop (it
    # waits for SSH if need be); cancelling the loop task cancels both.
    adoption = adopt_jobs_when_reachable(fleet, slurm, stored=set(fleet.instances))
    loop_task = asyncio.create_task(
        _gather(control.run(), adoption, telemetry.run()), name="control-loop"
    )
    metrics = maybe_serve(
        lambda: controller_metrics(fleet, executor),
        settings.metrics_host,
        settings.metrics_port,
        settings.metrics_port_file,
    )
    write_port_file(settings.port_file, port)
    log.info(
        "controller serving on %s:%d (%s; mutual TLS on %s) with %d models (%s)",
        settings.host, port, "PLAINTEXT" if ca is None else "TLS", mesh[0],
        len(fleet.catalog.models), ", ".join(fleet.catalog.names),
    )  # fmt: skip
    return Controller(
        server, port, fleet, store, launchers, executor, loop_task, settings, keys, admin_key,
        metrics, telemetry_store, mesh_port, ca, enrollments, background, usage,
    )  # fmt: skip
