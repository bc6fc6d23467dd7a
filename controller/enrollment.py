"""Enrollment: how a process trades a token for its certificate.

No token is worth more than the process that holds it:
- an instance's agent gets a one-time token bound to that instance, minted at
  launch; it enrolls only while the instance waits for its agent, and once;
- a facade, a Mac host or an operator gets a token an operator made
  (`kscope facades|hosts add NAME`), reusable until revoked;
- the certificate names exactly the token's identity: a CSR asking for any
  other is refused.

Revoking a facade, host or operator revokes its enrollments: every certificate
they led to is refused from the next call on, and their live streams close.

Domain code only: controller/identity_servicer.py translates to gRPC.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from controller.ca import ClusterCA
from kscope_common.pki import Identity, PkiError, Role, agent_server_name
from kscope_common.tls import TOKEN_PREFIX, EnrollmentError, token_identity

if TYPE_CHECKING:
    from controller.store.enrollments import EnrollmentStore

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class EnrollmentKind(StrEnum):
    INSTANCE = "instance"
    """One instance's agent: one-time, made at launch."""
    FACADE = "facade"
    HOST = "host"
    """A Mac host agent."""
    OPERATOR = "operator"


@dataclass(frozen=True)
class EnrollmentRecord:
    id: str
    token_hash: str
    kind: EnrollmentKind
    name: str
    created_at: float
    expires_at: float
    """0: never (revocable all the same)."""
    revoked: bool = False
    uses: int = 0

    @property
    def identity(self) -> Identity:
        if self.kind is EnrollmentKind.INSTANCE:
            return Identity(Role.AGENT, f"instance/{self.name}", self.id)
        if self.kind is EnrollmentKind.HOST:
            return Identity(Role.AGENT, f"host/{self.name}", self.id)
        return Identity(Role(self.kind.value), self.name, self.id)


class EnrollmentRefused(Exception):
    """The token, CSR or caller is not good for a certificate; the message says why."""


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class EnrollmentRegistry:
    """Mints tokens, signs certificates for them, revokes them."""

    def __init__(
        self,
        store: EnrollmentStore,
        ca: ClusterCA,
        instance_waiting: Callable[[str, bool], str | None],
        on_revoked: Callable[[frozenset[str]], None],
    ):
        """`instance_waiting(id, renewal)` returns None while the instance waits
        for its agent (for a renewal: while it lives), or why not; `on_revoked`
        gets the whole revoked set."""
        self._store = store
        self._ca = ca
        self._instance_waiting = instance_waiting
        self._on_revoked = on_revoked
        self.revoked: frozenset[str] = frozenset()

    async def load(self) -> None:
        records = await self._store.list_all(include_instances=False)
        self.revoked = frozenset(r.id for r in records if r.revoked)
        self._on_revoked(self.revoked)

    async def create(
        self, kind: EnrollmentKind, name: str, expires_in_s: float = 0.0
    ) -> tuple[EnrollmentRecord, str]:
        """A new token for `kind` NAME: (its record, the token, shown once)."""
        if not _NAME.match(name):
            raise EnrollmentRefused(
                f"name {name!r}: use letters, digits, '.', '_' and '-' (at most 128)"
            )
        if expires_in_s < 0:
            raise EnrollmentRefused("expires_in_seconds must be 0 (never) or more")
        token = f"{TOKEN_PREFIX}.{kind.value}.{name}.{secrets.token_urlsafe(32)}"
        now = time.time()
        record = EnrollmentRecord(
            id=uuid.uuid4().hex[:16],
            token_hash=_hash(token),
            kind=kind,
            name=name,
            created_at=now,
            expires_at=now + expires_in_s if expires_in_s else 0.0,
        )
        await self._store.insert(record)
        if kind is not EnrollmentKind.INSTANCE:
            log.info("enrollment %s made for %s %s", record.id, kind.value, name)
        return record, token

    async def mint_for_instance(self, instance_id: str) -> str:
        """The one-time token an instance's agent enrolls with."""
        _, token = await self.create(EnrollmentKind.INSTANCE, instance_id)
        return token

    async def enroll(self, token: str, csr_pem: bytes) -> tuple[Identity, bytes]:
        """Check the token, then sign the CSR for exactly its identity."""
        try:
            token_identity(token)
        except EnrollmentError as exc:
            raise EnrollmentRefused(str(exc)) from None
        token_hash = _hash(token)
        record = await self._store.by_hash(token_hash)
        if record is None or not hmac.compare_digest(record.token_hash, token_hash):
            raise EnrollmentRefused("unknown enrollment token")
        if record.revoked:
            raise EnrollmentRefused(
                f"the enrollment of {record.kind.value} {record.name} was revoked"
            )
        if record.expires_at and time.time() >= record.expires_at:
            raise EnrollmentRefused(
                f"the enrollment token of {record.kind.value} {record.name} expired"
            )
        one_time = record.kind is EnrollmentKind.INSTANCE
        if one_time:
            if record.uses:
                raise EnrollmentRefused(
                    f"the enrollment token of instance {record.name} was already used"
                )
            why_not = self._instance_waiting(record.name, False)
            if why_not is not None:
                raise EnrollmentRefused(f"instance {record.name} takes no agent: {why_not}")
        identity = record.identity
        try:
            cert = self._sign(csr_pem, identity)
        except PkiError as exc:
            raise EnrollmentRefused(str(exc)) from None
        # Count the use only for a good CSR; a one-time token is used once, even
        # when two enrollments race.
        if not await self._store.use(record.id, one_time):
            raise EnrollmentRefused(
                f"the enrollment token of {record.kind.value} {record.name} was already used"
            )
        log.info("%s enrolled (enrollment %s)", identity, record.id)
        return identity, cert

    async def renew(self, caller: Identity, csr_pem: bytes) -> bytes:
        """A fresh certificate for the caller's own identity and enrollment."""
        if caller.enrollment in self.revoked:
            raise EnrollmentRefused(f"{caller} was revoked")
        if caller.instance_id:
            why_not = self._instance_waiting(caller.instance_id, True)
            if why_not is not None:
                raise EnrollmentRefused(f"instance {caller.instance_id} ended: {why_not}")
        try:
            return self._sign(csr_pem, caller)
        except PkiError as exc:
            raise EnrollmentRefused(str(exc)) from None

    def _sign(self, csr_pem: bytes, identity: Identity) -> bytes:
        dns = [agent_server_name(identity.uri)] if identity.role is Role.AGENT else []
        return self._ca.sign_csr(csr_pem, identity, dns)

    async def list_enrollments(self, include_revoked: bool) -> list[EnrollmentRecord]:
        return [r for r in await self._store.list_all() if include_revoked or not r.revoked]

    async def revoke(self, kind: EnrollmentKind, name: str) -> list[EnrollmentRecord]:
        if kind is EnrollmentKind.INSTANCE:
            raise EnrollmentRefused("instances end with StopInstance, not by revocation")
        records = await self._store.revoke(kind, name)
        if not records:
            raise EnrollmentRefused(f"no {kind.value} named {name!r} was enrolled")
        self.revoked = self.revoked | {r.id for r in records}
        log.warning("revoked %s %s (%d enrollments)", kind.value, name, len(records))
        self._on_revoked(self.revoked)
        return records
