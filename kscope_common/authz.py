"""Who may call which RPC: one table, enforced by one server interceptor.

Every KScope gRPC server installs `AuthzInterceptor`. It reads the caller's
identity from the TLS peer certificate (the SAN URI the cluster CA wrote) and,
where the table allows API keys, the `authorization: Bearer` metadata; it
refuses with UNAUTHENTICATED (no usable credential, or a revoked one) or
PERMISSION_DENIED (a known caller without that right) before the servicer
runs. Servicers read the caller from `current_principal()` when a rule needs
the request's content (an agent may register only for its own instance).

Live streams are tracked per enrollment, so revoking a facade or host closes
its streams at once instead of at their next call.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import grpc

from kscope_common.pki import Identity, PkiError, Role, identity_from_uris

log = logging.getLogger(__name__)


class Right(StrEnum):
    """One kind of caller a rule admits."""

    ANYONE = "anyone"
    FACADE = "facade"
    AGENT = "agent"
    OPERATOR = "operator"
    """An operator certificate."""
    ANY_CERT = "any certificate"
    ADMIN_KEY = "admin key"
    USER_KEY = "user key"


F, A, OP, C = Right.FACADE, Right.AGENT, Right.OPERATOR, Right.ANY_CERT
ADMIN, USER, ANYONE = Right.ADMIN_KEY, Right.USER_KEY, Right.ANYONE

_CONTROL = "/kscope.v1.ControlService/"
_AGENT = "/kscope.v1.AgentService/"
_KEYS = "/kscope.v1.KeyService/"
_IDENTITY = "/kscope.v1.IdentityService/"
_INFERENCE = "/kscope.v1.InferenceService/"
_USAGE = "/kscope.v1.UsageService/"

RULES: Mapping[str, frozenset[Right]] = {
    # ControlService: reads for operators and facades; StopInstance for operators only.
    **{
        _CONTROL + m: frozenset({F, OP, ADMIN})
        for m in ("ListModels", "ListInstances", "ListAgents", "GetTelemetry", "ListDecisions")
    },
    _CONTROL + "EnsureModel": frozenset({F, OP, ADMIN}),
    _CONTROL + "StopInstance": frozenset({OP, ADMIN}),
    _CONTROL + "ScaleModel": frozenset({OP, ADMIN}),
    _CONTROL + "WatchRoutes": frozenset({F}),
    # AgentService: agents only, and (checked by the servicer) only for themselves.
    _AGENT + "Register": frozenset({A}),
    _AGENT + "Session": frozenset({A}),
    # KeyService: facades check keys; key management is for keys (the registry
    # keeps a user key to its own, narrower keys) and operators.
    _KEYS + "AuthenticateKey": frozenset({F}),
    _KEYS + "WatchKeyEvents": frozenset({F}),
    **{
        _KEYS + m: frozenset({USER, ADMIN, OP})
        for m in ("CreateKey", "ListKeys", "RevokeKey", "ListOwnerLimits")
    },
    # Limits and priorities: checked as admin-only by the registry too.
    **{_KEYS + m: frozenset({ADMIN, OP}) for m in ("UpdateKey", "SetOwnerLimits")},
    # UsageService: facades report; keys and operators read (a user key its owner's).
    _USAGE + "ReportUsage": frozenset({F}),
    _USAGE + "QueryUsage": frozenset({USER, ADMIN, OP}),
    # IdentityService: enrollment is open (the token is the credential).
    _IDENTITY + "Discover": frozenset({ANYONE}),
    _IDENTITY + "Enroll": frozenset({ANYONE}),
    _IDENTITY + "Renew": frozenset({C}),
    **{
        _IDENTITY + m: frozenset({OP, ADMIN})
        for m in ("CreateEnrollment", "ListEnrollments", "RevokeEnrollment")
    },
    # InferenceService on agents: facades only.
    **{
        _INFERENCE + m: frozenset({F})
        for m in ("ChatCompletion", "Completion", "Embedding", "Inference", "Multiplex")
    },
    # Load balancers probe health without credentials; reflection shows the API
    # to those who may use it.
    "/grpc.health.v1.Health/Check": frozenset({ANYONE}),
    "/grpc.health.v1.Health/Watch": frozenset({ANYONE}),
    "/grpc.health.v1.Health/List": frozenset({ANYONE}),
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": frozenset({C, ADMIN}),
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": frozenset({C, ADMIN}),
}
"""Method → who may call it. A method not listed is refused to everyone."""

_CERT_RIGHTS = {Role.FACADE: F, Role.AGENT: A, Role.OPERATOR: OP}


@dataclass(frozen=True)
class KeyHolder:
    """The API key a call carried, as the controller resolved it."""

    owner: str
    admin: bool


@dataclass(frozen=True)
class Principal:
    """Who is calling."""

    identity: Identity | None = None
    """From the peer certificate; None without one."""
    key: KeyHolder | None = None
    """From the bearer key, when a rule needed it."""
    plaintext: bool = False
    """The server runs without TLS (a debugging mode): nobody can be identified,
    so cert-only rules are not enforced."""

    def describe(self) -> str:
        if self.identity is not None:
            return str(self.identity)
        if self.key is not None:
            return f"key of {self.key.owner}"
        return "an anonymous caller"


_CURRENT: contextvars.ContextVar[Principal] = contextvars.ContextVar("kscope_principal")


def current_principal() -> Principal:
    """The caller of the RPC being served (set by the interceptor)."""
    return _CURRENT.get(Principal())


class Refusal(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


KeyResolver = Callable[[str], Awaitable[KeyHolder]]
"""Resolves a bearer credential; raises Refusal(UNAUTHENTICATED) for a bad one."""


def bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The credential in `authorization: Bearer …`, or ''."""
    for name, value in metadata or ():
        if name == "authorization" and isinstance(value, str):
            scheme, _, credential = value.partition(" ")
            if scheme.lower() == "bearer":
                return credential.strip()
    return ""


class IdentityCache:
    """Peer SAN URIs → Identity, parsed once per distinct certificate."""

    def __init__(self) -> None:
        self._known: dict[tuple[bytes, ...], Identity | None] = {}

    def of(self, auth: Mapping[str, Iterable[bytes]]) -> Identity | None:
        uris = tuple(auth.get("peer_uri", ()) or auth.get("x509_subject_alternative_name", ()))
        if not uris:
            return None
        if uris not in self._known:
            if len(self._known) > 10_000:  # certificates rotate; forget old ones
                self._known.clear()
            self._known[uris] = _identity_from_uris([u.decode(errors="replace") for u in uris])
        return self._known[uris]


def _identity_from_uris(uris: list[str]) -> Identity | None:
    try:
        return identity_from_uris(uris)
    except PkiError:
        return None


class Revocations:
    """Revoked enrollments, and the live streams of every enrollment, so a
    revocation closes them within the same event-loop turn."""

    def __init__(self) -> None:
        self.revoked: frozenset[str] = frozenset()
        self._streams: dict[str, set[grpc.aio.ServicerContext[Any, Any]]] = {}
        self._closing: set[asyncio.Future[None]] = set()

    def is_revoked(self, enrollment: str) -> bool:
        return bool(enrollment) and enrollment in self.revoked

    def replace(self, enrollments: Iterable[str]) -> None:
        """The whole revoked list (an agent hears it from the controller)."""
        self.revoked = frozenset(enrollments)
        for enrollment in self.revoked & set(self._streams):
            self._close(enrollment)

    def add(self, enrollments: Iterable[str]) -> None:
        self.replace(self.revoked | set(enrollments))

    def _close(self, enrollment: str) -> None:
        for context in list(self._streams.pop(enrollment, ())):
            log.warning("closing a stream of revoked enrollment %s", enrollment)
            closing = asyncio.ensure_future(_abort_quietly(context))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    def track(self, enrollment: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._streams.setdefault(enrollment, set()).add(context)

    def untrack(self, enrollment: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        contexts = self._streams.get(enrollment)
        if contexts is not None:
            contexts.discard(context)
            if not contexts:
                del self._streams[enrollment]


async def _abort_quietly(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    # abort() raises in the caller by design; here the caller is not the handler.
    with contextlib.suppress(Exception):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "this identity was revoked")


class AuthzInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Checks RULES on every call before the servicer runs."""

    def __init__(
        self,
        rules: Mapping[str, frozenset[Right]] = RULES,
        keys: KeyResolver | None = None,
        revocations: Revocations | None = None,
        plaintext: bool = False,
    ):
        self._rules = rules
        self._keys = keys
        self.revocations = revocations or Revocations()
        self._plaintext = plaintext
        self._identities = IdentityCache()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method: str = handler_call_details.method
        rights = self._rules.get(method, frozenset())
        return _wrap(handler, lambda context: self.authorize(method, rights, context), self)

    async def authorize(
        self, method: str, rights: frozenset[Right], context: grpc.aio.ServicerContext[Any, Any]
    ) -> Principal:
        """The caller, if RULES lets it call `method`; Refusal otherwise."""
        if Right.ANYONE in rights:
            return Principal(plaintext=self._plaintext)
        if self._plaintext:
            # Nobody can be identified: the facade and agent roles are open (or
            # nothing would work); operator rights still need an admin key.
            principal = Principal(plaintext=True)
            if rights & {F, A}:
                return principal
            return await self._by_key(method, rights, context, principal)
        identity = self._identities.of(context.auth_context())
        principal = Principal(identity=identity)
        if identity is not None:
            if self.revocations.is_revoked(identity.enrollment):
                raise Refusal(grpc.StatusCode.UNAUTHENTICATED, f"{identity} was revoked")
            right = _CERT_RIGHTS.get(identity.role)
            if right in rights or (C in rights and right is not None):
                return principal
        return await self._by_key(method, rights, context, principal)

    async def _by_key(
        self,
        method: str,
        rights: frozenset[Right],
        context: grpc.aio.ServicerContext[Any, Any],
        principal: Principal,
    ) -> Principal:
        name = method.rsplit("/", 1)[-1]
        credential = bearer(context.invocation_metadata())
        if not rights & {ADMIN, USER} or self._keys is None:
            if principal.identity is None and not principal.plaintext:
                raise Refusal(
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"{name} needs a KScope certificate (mutual TLS)",
                )
            raise Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{principal.describe()} may not call {name}",
            )
        if not credential:
            if principal.identity is not None:
                raise Refusal(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{principal.describe()} may not call {name}",
                )
            raise Refusal(
                grpc.StatusCode.UNAUTHENTICATED,
                f"{name} needs an API key: send 'authorization: Bearer <key>'",
            )
        holder = await self._keys(credential)
        if (ADMIN in rights and holder.admin) or USER in rights:
            return Principal(principal.identity, holder, principal.plaintext)
        raise Refusal(grpc.StatusCode.PERMISSION_DENIED, f"{name} needs an admin key")


Handler = Any
"""grpc.RpcMethodHandler; its stubs describe the sync API only."""

Authorize = Callable[[grpc.aio.ServicerContext[Any, Any]], Awaitable[Principal]]


async def _admit(authorize: Authorize, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
    try:
        principal = await authorize(context)
    except Refusal as refusal:
        await context.abort(refusal.code, refusal.message)
        raise  # unreachable: abort raises
    _CURRENT.set(principal)
    return principal


def _wrap(handler: Handler, authorize: Authorize, interceptor: AuthzInterceptor) -> Handler:
    revocations = interceptor.revocations
    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await _admit(authorize, context)
            return await inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        async def stream_unary(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await _admit(authorize, context)
            return await inner_su(requests, context)

        return grpc.stream_unary_rpc_method_handler(
            stream_unary, handler.request_deserializer, handler.response_serializer
        )
    inner_stream = handler.unary_stream or handler.stream_stream
    assert inner_stream is not None

    async def streaming(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        principal = await _admit(authorize, context)
        enrollment = principal.identity.enrollment if principal.identity else ""
        if enrollment:
            revocations.track(enrollment, context)
        try:
            async for response in inner_stream(request, context):
                yield response
        finally:
            if enrollment:
                revocations.untrack(enrollment, context)

    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            streaming, handler.request_deserializer, handler.response_serializer
        )
    return grpc.stream_stream_rpc_method_handler(
        streaming, handler.request_deserializer, handler.response_serializer
    )
