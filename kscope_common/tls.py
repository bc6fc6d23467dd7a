"""A process's own certificate: enrolled once, renewed before it expires, and
turned into gRPC credentials for its servers and channels.

Servers use dynamic credentials, so a renewed certificate is served from the
next handshake on. gRPC's channel credentials are fixed, so a renewal makes
new channels use the new certificate while open connections (and the streams
on them) carry on: a certificate is only checked at the handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc

from kscope.v1 import identity_pb2, identity_pb2_grpc
from kscope_common.grpc_server import CHANNEL_OPTIONS
from kscope_common.pki import (
    CLOCK_SKEW_S,
    CONTROLLER_DNS_NAME,
    Identity,
    PkiError,
    Role,
    agent_server_name,
    identity_of,
    key_pem,
    load_cert,
    make_csr,
    new_private_key,
    not_after,
    not_before,
)

log = logging.getLogger(__name__)

TOKEN_PREFIX = "kse1"
_ENROLL_TIMEOUT_S = 10.0


class EnrollmentError(Exception):
    """The process could not get a certificate; the message says why."""


def token_identity(token: str) -> Identity:
    """The identity an enrollment token is for (it is written in the token:
    `kse1.<role or kind>.<name>.<secret>`); EnrollmentError for a malformed one."""
    head, _, rest = token.partition(".")
    kind, _, rest = rest.partition(".")
    name, _, secret = rest.rpartition(".")
    if head != TOKEN_PREFIX or not name or not secret:
        raise EnrollmentError("not a KScope enrollment token (kse1.…)")
    if kind == "instance":
        return Identity(Role.AGENT, f"instance/{name}")
    if kind == "host":
        return Identity(Role.AGENT, f"host/{name}")
    try:
        return Identity(Role(kind), name)
    except ValueError:
        raise EnrollmentError(f"an enrollment token of unknown kind {kind!r}") from None


@dataclass
class ProcessCertificate:
    """This process's key, certificate and the cluster CA, kept current."""

    ca_pem: bytes
    key_pem: bytes
    cert_pem: bytes
    generation: int = 0
    """Bumped by every renewal."""
    _listeners: list[Callable[[], None]] = field(default_factory=list)

    @property
    def identity(self) -> Identity:
        return identity_of(load_cert(self.cert_pem))

    @property
    def expires_at(self) -> float:
        return not_after(self.cert_pem)

    def replace(self, key: bytes, cert: bytes) -> None:
        self.key_pem, self.cert_pem = key, cert
        self.generation += 1
        for listener in list(self._listeners):
            listener()

    def on_renewal(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.ca_pem, self.key_pem, self.cert_pem)

    def server_credentials(self, mutual: bool = True) -> grpc.ServerCredentials:
        """TLS with renewed certificates served from the next handshake on;
        `mutual`: client certificates required (else not asked for at all:
        gRPC has no "optional" mode, hence the controller's two ports)."""
        served = [self.generation]

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            if served[0] == self.generation:
                return None
            served[0] = self.generation
            return grpc.ssl_server_certificate_configuration(
                [(self.key_pem, self.cert_pem)], self.ca_pem
            )

        return grpc.dynamic_ssl_server_credentials(
            grpc.ssl_server_certificate_configuration([(self.key_pem, self.cert_pem)], self.ca_pem),
            fetch,  # type: ignore[arg-type]  # None means "no change", as documented
            require_client_authentication=mutual,
        )

    def channel(
        self, address: str, server_name: str, options: Sequence[tuple[str, int]] = ()
    ) -> grpc.aio.Channel:
        """A mutual-TLS channel to a server whose certificate names `server_name`."""
        return grpc.aio.secure_channel(
            address,
            self.channel_credentials(),
            options=[*CHANNEL_OPTIONS, *options, ("grpc.ssl_target_name_override", server_name)],
        )

    def controller_channel(self, address: str) -> grpc.aio.Channel:
        return self.channel(address, CONTROLLER_DNS_NAME)

    def agent_channel(
        self, address: str, agent: Identity, options: Sequence[tuple[str, int]] = ()
    ) -> grpc.aio.Channel:
        return self.channel(address, agent_server_name(agent.uri), options)


def public_channel(address: str, ca_pem: bytes | None) -> grpc.aio.Channel:
    """A channel to the controller's public port: server-authenticated TLS with
    the cluster CA (None: plaintext debugging mode)."""
    if ca_pem is None:
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    return grpc.aio.secure_channel(
        address,
        grpc.ssl_channel_credentials(ca_pem),
        options=[*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", CONTROLLER_DNS_NAME)],
    )


@dataclass(frozen=True)
class Enrolled:
    certificate: ProcessCertificate
    mesh_address: str
    """host:port of the controller's mutual-TLS port."""


async def enroll(controller: str, ca_pem: bytes, token: str) -> Enrolled:
    """Trade an enrollment token for a certificate at the controller's public port."""
    identity = token_identity(token)
    key = new_private_key()
    request = identity_pb2.EnrollRequest(token=token, csr_pem=make_csr(key, identity).decode())
    async with public_channel(controller, ca_pem) as channel:
        try:
            reply = await identity_pb2_grpc.IdentityServiceStub(channel).Enroll(
                request, timeout=_ENROLL_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            raise EnrollmentError(
                f"enrollment as {identity} at {controller} failed: "
                f"{exc.code().name}: {exc.details()}"
            ) from exc
    cert = reply.certificate_pem.encode()
    log.info("enrolled as %s; certificate valid until %s", reply.identity,
             time.strftime("%H:%M:%S", time.localtime(not_after(cert))))  # fmt: skip
    return Enrolled(ProcessCertificate(ca_pem, key_pem(key), cert), reply.mesh_address)


async def join(controller: str, tls_ca: str, token: str, what: str) -> Enrolled:
    """Enroll `what` (a facade, an agent) with the token and CA its settings give;
    EnrollmentError naming the missing setting when one is absent."""
    if not token:
        raise EnrollmentError(
            f"no enrollment token for this {what}: set KSCOPE_ENROLL_TOKEN "
            "(`kscope facades|hosts add NAME` prints one; launchers set it for instances)"
        )
    if not tls_ca:
        raise EnrollmentError(
            "no CA certificate: set KSCOPE_TLS_CA to the cluster CA (`kscope ca` prints it)"
        )
    return await enroll(controller, read_ca(tls_ca), token)


async def discover(controller: str, ca_pem: bytes | None, timeout_s: float = 5.0) -> str:
    """The controller's mutual-TLS address (it may change when it restarts)."""
    async with public_channel(controller, ca_pem) as channel:
        reply = await identity_pb2_grpc.IdentityServiceStub(channel).Discover(
            identity_pb2.DiscoverRequest(), timeout=timeout_s
        )
    return reply.mesh_address


def renew_at(cert_pem: bytes) -> float:
    """When to renew: two thirds into the certificate's life, counted from when
    it was issued (its notBefore is set CLOCK_SKEW_S early)."""
    issued, end = not_before(cert_pem) + CLOCK_SKEW_S, not_after(cert_pem)
    return issued + (end - issued) * 2 / 3


async def keep_renewed(
    certificate: ProcessCertificate,
    renew: Callable[[bytes], Awaitable[bytes]],
    retry_s: float = 1.0,
) -> None:
    """Renew `certificate` two thirds into each lifetime, forever. `renew` takes
    a CSR PEM and returns the new certificate PEM."""
    while True:
        await asyncio.sleep(max(0.0, renew_at(certificate.cert_pem) - time.time()))
        key = new_private_key()
        try:
            cert = await renew(make_csr(key, certificate.identity))
        except (grpc.aio.AioRpcError, PkiError, OSError) as exc:
            log.warning("certificate renewal failed (%s); retrying in %.0f s", exc, retry_s)
            await asyncio.sleep(retry_s)
            continue
        certificate.replace(key_pem(key), cert)
        log.info("certificate renewed; valid until %s",
                 time.strftime("%H:%M:%S", time.localtime(not_after(cert))))  # fmt: skip


class ControllerMesh:
    """Channels to the controller's mutual-TLS port for one process, rebuilt
    when the certificate is renewed or the controller moves (a restart on
    another port): callers ask for `channel()` each time they (re)connect."""

    def __init__(self, public_address: str, certificate: ProcessCertificate, mesh_address: str):
        self.public_address = public_address
        self.certificate = certificate
        self.mesh_address = mesh_address
        self._channel: grpc.aio.Channel | None = None
        self._made_for: tuple[int, str] = (-1, "")
        self._old: list[grpc.aio.Channel] = []

    def channel(self) -> grpc.aio.Channel:
        wanted = (self.certificate.generation, self.mesh_address)
        if self._channel is None or self._made_for != wanted:
            if self._channel is not None:
                # Streams still open on it carry on; it is closed with the mesh.
                self._old.append(self._channel)
            self._channel = self.certificate.controller_channel(self.mesh_address)
            self._made_for = wanted
        return self._channel

    async def rediscover(self) -> None:
        """Ask the public port where the mesh port is now (after a failure)."""
        with contextlib.suppress(grpc.aio.AioRpcError):
            address = await discover(self.public_address, self.certificate.ca_pem)
            if address and address != self.mesh_address:
                log.info("the controller's mutual-TLS port moved to %s", address)
                self.mesh_address = address

    async def renew(self, csr_pem: bytes) -> bytes:
        reply = await identity_pb2_grpc.IdentityServiceStub(self.channel()).Renew(
            identity_pb2.RenewRequest(csr_pem=csr_pem.decode()), timeout=_ENROLL_TIMEOUT_S
        )
        return reply.certificate_pem.encode()

    async def close(self) -> None:
        for channel in [*self._old, *([self._channel] if self._channel else [])]:
            with contextlib.suppress(Exception):
                await channel.close(None)
        self._old.clear()
        self._channel = None


def read_ca(path_or_pem: str) -> bytes:
    """The CA certificate from a PEM string or a file holding one."""
    text = path_or_pem.strip()
    if text.startswith("-----BEGIN"):
        return (text + "\n").encode()
    try:
        with open(text, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise EnrollmentError(f"cannot read the CA certificate {text}: {exc.strerror}") from exc
    try:
        load_cert(data)
    except PkiError as exc:
        raise EnrollmentError(f"{text}: {exc}") from exc
    return data


class PlaintextController:
    """ControllerMesh's stand-in in plaintext debugging mode: one insecure channel."""

    def __init__(self, address: str):
        self.public_address = self.mesh_address = address
        self._channel: grpc.aio.Channel | None = None

    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.mesh_address, options=CHANNEL_OPTIONS)
        return self._channel

    async def rediscover(self) -> None:
        """Nothing moves in plaintext mode: one port for everything."""

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(None)
            self._channel = None


ControllerConnection = ControllerMesh | PlaintextController
