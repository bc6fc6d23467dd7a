"""What every KScope gRPC server has: health, reflection, a port it reports."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # Notice dead peers (a SIGKILLed agent on another node) within seconds.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.so_reuseport", 0),
]

CHANNEL_OPTIONS: list[tuple[str, int]] = [
    # gRPC's default reconnect backoff grows to minutes; a restarted controller or
    # agent must be found again within a second or two.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 5_000),  # despite its name: each connect attempt's timeout
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


def add_health_and_reflection(
    server: grpc.aio.Server, service_full_names: Sequence[str]
) -> HealthServicer:
    """Serve grpc.health.v1 (every service SERVING) and server reflection, so
    `grpcurl -cacert ca.pem -H 'authorization: Bearer ks-…' host:port list`
    works with no proto files (reflection needs a credential: see authz)."""
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [*service_full_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
    reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], server)
    return health_servicer


async def mark_serving(health_servicer: HealthServicer, service_full_names: Sequence[str]) -> None:
    for name in ["", *service_full_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


async def mark_not_serving(
    health_servicer: HealthServicer, service_full_names: Sequence[str]
) -> None:
    for name in ["", *service_full_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)


def bind(
    server: grpc.aio.Server,
    host: str,
    port: int,
    credentials: grpc.ServerCredentials | None = None,
) -> int:
    """Bind with TLS credentials (None: plaintext); returns the real port (port
    0 picks one)."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if credentials is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, credentials)
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
    return bound


def write_port_file(path: Path | None, port: int) -> None:
    """Write the port atomically, so a parent waiting for it never reads half."""
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, path)
