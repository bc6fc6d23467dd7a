"""Builds and runs the controller: store, fleet, launchers, control loop, gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import grpc

from controller.adoption import adopt_jobs_when_reachable
from controller.catalog import Catalog, load_catalog
from controller.control_loop import ControlLoop
from controller.executor import Executor
from controller.fleet import Fleet, FleetTimings
from controller.key_servicer import KeyServicer
from controller.keys import KeyRegistry
from controller.launchers.base import Launcher
from controller.launchers.host import HostLauncher
from controller.launchers.local import LocalLauncher
from controller.launchers.slurm import build_slurm_launcher
from controller.metrics import controller_metrics
from controller.servicers import AgentServicer, ControlServicer
from controller.settings import ControllerSettings
from controller.store.keys import KeyStore
from controller.store.sqlite import SqliteStore
from controller.telemetry import Telemetry, TelemetryStore
from kscope.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    control_pb2,
    control_pb2_grpc,
    keys_pb2,
    keys_pb2_grpc,
)
from kscope_common.grpc_server import (
    SERVER_OPTIONS,
    add_health_and_reflection,
    bind,
    mark_serving,
    write_port_file,
)
from kscope_common.metrics import MetricsServer, maybe_serve

log = logging.getLogger(__name__)

SERVICE_NAMES = [
    agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
    control_pb2.DESCRIPTOR.services_by_name["ControlService"].full_name,
    keys_pb2.DESCRIPTOR.services_by_name["KeyService"].full_name,
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

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop serving; with stop_instances_on_exit, stop local instances too."""
        self.loop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.loop_task
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


async def start_controller(
    settings: ControllerSettings, catalog: Catalog | None = None
) -> Controller:
    """Start a controller and return once it serves."""
    store = SqliteStore(settings.database_path)
    token = settings.resolve_token()
    fleet = Fleet(
        store,
        await _resolve_catalog(settings, store, catalog),
        token,
        FleetTimings(
            report_interval_s=settings.report_interval_s,
            agent_stale_after_s=settings.agent_stale_after_s,
            reconnect_grace_s=settings.reconnect_grace_s,
        ),
    )
    await fleet.load()
    keys = KeyRegistry(
        KeyStore(settings.database_path),
        token,
        settings.key_default_ttl_days * 86400,
        settings.key_max_ttl_days * 86400,
    )
    admin_key = await keys.bootstrap_admin(settings.admin_key_path)

    telemetry_store = TelemetryStore(settings.database_path)
    telemetry = Telemetry(
        fleet, telemetry_store, settings.min_update_interval_seconds,
        settings.max_num_historic_records, settings.telemetry_callback_url,
    )  # fmt: skip

    server = grpc.aio.server(options=SERVER_OPTIONS)
    agent_pb2_grpc.add_AgentServiceServicer_to_server(AgentServicer(fleet), server)
    executors: list[Executor] = []  # the executor needs the bound port: made below
    control_servicer = ControlServicer(
        fleet, telemetry_store, lambda: list(executors[0].recent) if executors else []
    )
    control_pb2_grpc.add_ControlServiceServicer_to_server(control_servicer, server)
    keys_pb2_grpc.add_KeyServiceServicer_to_server(KeyServicer(keys), server)
    health = add_health_and_reflection(server, SERVICE_NAMES)
    port = bind(server, settings.host, settings.port)
    await server.start()
    await mark_serving(health, SERVICE_NAMES)

    slurm = build_slurm_launcher(settings)  # connects on first use only
    launchers: dict[str, Launcher] = {
        "local": LocalLauncher(settings.state_path / "logs", python=settings.agent_python),
        "slurm": slurm,
        "host": HostLauncher(fleet),
    }
    executor = Executor(fleet, launchers, _advertise_address(settings, port), token)
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
        "controller serving on %s:%d with %d models (%s)",
        settings.host, port, len(fleet.catalog.models), ", ".join(fleet.catalog.names),
    )  # fmt: skip
    return Controller(
        server, port, fleet, store, launchers, executor, loop_task, settings, keys, admin_key,
        metrics, telemetry_store,
    )  # fmt: skip
