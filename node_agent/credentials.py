"""How an agent gets its certificate: enroll at the controller's public port
with its one-time (instance) or host token, then keep the certificate renewed.

The token leaves the process's environment as soon as it is read, so nothing
the agent starts (vLLM, an instance's agent) inherits it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field

from kscope_common.authz import AuthzInterceptor, Revocations
from kscope_common.tls import (
    ControllerConnection,
    ControllerMesh,
    PlaintextController,
    ProcessCertificate,
    join,
    keep_renewed,
)
from node_agent.settings import AgentSettings

log = logging.getLogger(__name__)

SECRET_ENVIRONMENT = (
    "KSCOPE_ENROLL_TOKEN", "KSCOPE_REGISTRATION_TOKEN", "KSCOPE_UPSTREAM_API_KEY",
)  # fmt: skip
"""Variables that hold secrets: out of /proc/<pid>/environ (kscope_common/handoff.py)
and, for the enrollment token, out of os.environ once read."""


@dataclass
class AgentCredentials:
    """The agent's connection to the controller and what its server checks."""

    controller: ControllerConnection
    certificate: ProcessCertificate | None
    """None in plaintext mode."""
    revocations: Revocations = field(default_factory=Revocations)
    _renewal: asyncio.Task[None] | None = None

    def interceptor(self) -> AuthzInterceptor:
        """Only facades may call InferenceService; revoked ones are refused."""
        return AuthzInterceptor(revocations=self.revocations, plaintext=self.certificate is None)

    def on_revoked(self, enrollment_ids: list[str]) -> None:
        self.revocations.replace(enrollment_ids)

    def start_renewing(self) -> None:
        if self.certificate is not None and isinstance(self.controller, ControllerMesh):
            self._renewal = asyncio.create_task(
                keep_renewed(self.certificate, self.controller.renew), name="cert-renewal"
            )

    async def close(self) -> None:
        if self._renewal is not None:
            self._renewal.cancel()
        await self.controller.close()


def scrub_secrets() -> None:
    for name in SECRET_ENVIRONMENT:
        os.environ.pop(name, None)


async def obtain(settings: AgentSettings, token: str, scrub: bool = True) -> AgentCredentials:
    """Enroll (or, in plaintext mode, just connect); EnrollmentError says why not.
    `scrub`: take the secrets out of this process's environment first (not for
    an agent that shares its process: they are not its own)."""
    if scrub:
        scrub_secrets()
    if settings.insecure_plaintext:
        log.warning(
            "KSCOPE_INSECURE_PLAINTEXT: this agent serves WITHOUT TLS; any process that "
            "reaches its port can send it requests. Use this only to debug."
        )
        return AgentCredentials(PlaintextController(settings.controller), None)
    enrolled = await join(settings.controller, settings.tls_ca, token, "agent")
    mesh = ControllerMesh(settings.controller, enrolled.certificate, enrolled.mesh_address)
    return AgentCredentials(mesh, enrolled.certificate)
