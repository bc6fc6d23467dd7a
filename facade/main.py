"""`kscope-facade`: the OpenAI-compatible HTTP front door."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
from collections.abc import Callable, Iterator

import uvicorn
from pydantic import ValidationError

from facade.app import create_app
from facade.mesh import GivenCertificate
from facade.settings import FacadeSettings
from kscope_common.cli import CommandLine
from kscope_common.daemon import run, wait_for_stop_signal
from kscope_common.grpc_server import write_port_file
from kscope_common.handoff import reexec_without, take_handed_over
from kscope_common.logs import configure_logging

log = logging.getLogger("facade")


COMMAND_LINE = CommandLine(
    "kscope-facade", FacadeSettings, description=__doc__ or "", aliases={"--ca": "tls_ca"}
)
"""One flag per FacadeSettings field (the portal's as --portal-*); --api-key and
the other secrets are refused (kscope_common/cli.py)."""


def parse_settings(argv: list[str] | None = None) -> FacadeSettings:
    """Flags override KSCOPE_* environment variables, which override defaults."""
    return COMMAND_LINE.parse(argv)


CLIENT_SEND_BUFFER_BYTES = 256 * 1024


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it: a client that stops reading holds at most
    # this much kernel memory (not the kernel's autotuned megabytes) before the
    # stream's flow control stops its request.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CLIENT_SEND_BUFFER_BYTES)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server without its own signal handling: the caller decides when
    to stop (uvicorn would otherwise re-raise the signal and skip our clean-up)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def make_server(settings: FacadeSettings, given: GivenCertificate | None = None) -> uvicorn.Server:
    config = uvicorn.Config(
        create_app(settings, given),
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=10,
        backlog=2048,
    )
    return _Server(config)


async def serve_http(
    settings: FacadeSettings,
    on_started: Callable[[int], None] | None = None,
    given: GivenCertificate | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM. `on_started` gets the port once requests are
    answered (the lifespan ran); `given`: a certificate made for this facade."""
    sock = bind_socket(settings.host, settings.port)
    port: int = sock.getsockname()[1]
    server = make_server(settings, given)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not serving.done():
        await asyncio.sleep(0.02)
    if server.started:
        log.info("facade listening on http://%s:%d/v1 (controller %s)", settings.host, port,
                 settings.controller)  # fmt: skip
        write_port_file(settings.port_file, port)
        if on_started is not None:
            on_started(port)
    stop = asyncio.create_task(wait_for_stop_signal())
    await asyncio.wait({serving, stop}, return_when=asyncio.FIRST_COMPLETED)
    if stop.done():
        log.info("received %s; stopping", stop.result().name)
        server.should_exit = True
    else:
        stop.cancel()
    await serving
    if not server.started:
        raise SystemExit("kscope-facade: could not start (the log above says why)")


SECRET_ENVIRONMENT = (
    "KSCOPE_ENROLL_TOKEN", "KSCOPE_API_KEY", "KSCOPE_PORTAL_SERVICE_KEY",
    "KSCOPE_PORTAL_SESSION_SECRET", "KSCOPE_PORTAL_LDAP_BIND_PASSWORD",
)  # fmt: skip
"""Read once at start, then gone from /proc/<pid>/environ (kscope_common/handoff.py)."""


def main(argv: list[str] | None = None, hand_off: bool | None = None) -> None:
    """`hand_off` (default: when argv is this process's own) first moves the
    secrets out of the environment the kernel shows (kscope_common/handoff.py)."""
    if hand_off is None:
        hand_off = argv is None
    if hand_off:
        reexec_without(SECRET_ENVIRONMENT)
        take_handed_over()
    configure_logging("facade")
    try:
        settings = parse_settings(argv)
    except ValidationError as exc:
        sys.exit(f"kscope-facade: {exc}")
    run(serve_http(settings))


if __name__ == "__main__":
    main()
