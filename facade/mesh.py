"""The facade's side of the mutual-TLS mesh: its certificate (enrolled with a
facade token, or handed over by `kscope serve`), its channels to the
controller, and the channels to agents, each checked against the agent
certificate of the instance the route table names."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from facade.settings import FacadeSettings
from kscope_common.grpc_server import CHANNEL_OPTIONS
from kscope_common.pki import agent_instance
from kscope_common.tls import (
    ControllerConnection,
    ControllerMesh,
    PlaintextController,
    ProcessCertificate,
    join,
    keep_renewed,
)

log = logging.getLogger(__name__)

PER_CALL_OPTIONS = (("grpc.http2.bdp_probe", 0),)


@dataclass(frozen=True)
class GivenCertificate:
    """A certificate made for this facade by the process that runs it
    (`kscope serve`), which also keeps it renewed."""

    certificate: ProcessCertificate
    mesh_address: str


class FacadeMesh:
    """Everything the facade dials, with its own identity."""

    def __init__(
        self,
        controller: ControllerConnection,
        certificate: ProcessCertificate | None,
        per_call: bool = False,
    ):
        self.controller = controller
        self.certificate = certificate
        # One call per request relies on HTTP/2's per-stream windows for flow
        # control; BDP probing would grow them to megabytes a request.
        self._options = PER_CALL_OPTIONS if per_call else ()
        self._renewal: asyncio.Task[None] | None = None

    def agent_channel(self, address: str, instance_id: str) -> grpc.aio.Channel:
        """A channel to the agent of `instance_id`, which must present that
        instance's certificate (a stolen address is not enough)."""
        if self.certificate is None:
            return grpc.aio.insecure_channel(address, options=[*CHANNEL_OPTIONS, *self._options])
        return self.certificate.agent_channel(address, agent_instance(instance_id), self._options)

    def on_renewal(self, listener: Callable[[], None]) -> None:
        if self.certificate is not None:
            self.certificate.on_renewal(listener)

    def start_renewing(self) -> None:
        if self.certificate is not None and isinstance(self.controller, ControllerMesh):
            self._renewal = asyncio.create_task(
                keep_renewed(self.certificate, self.controller.renew), name="cert-renewal"
            )

    async def close(self) -> None:
        if self._renewal is not None:
            self._renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewal
        await self.controller.close()


async def connect(settings: FacadeSettings, given: GivenCertificate | None) -> FacadeMesh:
    """Enroll (unless given a certificate); EnrollmentError says why not."""
    if settings.insecure_plaintext:
        log.warning(
            "KSCOPE_INSECURE_PLAINTEXT: this facade talks to the controller and agents "
            "WITHOUT TLS. Use this only to debug."
        )
        return FacadeMesh(PlaintextController(settings.controller), None, not settings.multiplex)
    if given is not None:
        mesh = ControllerMesh(settings.controller, given.certificate, given.mesh_address)
        return FacadeMesh(mesh, given.certificate, not settings.multiplex)
    token = settings.enroll_token.get_secret_value() if settings.enroll_token else ""
    enrolled = await join(settings.controller, settings.tls_ca, token, "facade")
    facade = FacadeMesh(
        ControllerMesh(settings.controller, enrolled.certificate, enrolled.mesh_address),
        enrolled.certificate,
        not settings.multiplex,
    )
    facade.start_renewing()
    return facade
