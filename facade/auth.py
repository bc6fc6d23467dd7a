"""API-key checks on the token path, with no controller round trip per request.

A key is known by the SHA-256 of its secret. The facade keeps what the
controller said about each hash for a short while (`key_cache_ttl_s`), and the
controller pushes revocations on WatchKeyEvents, so a revoked key is refused
within a second everywhere. While that stream is down, cached answers are
trusted for one second only. A cached check is one dict lookup: no await.

Secrets never appear in logs or error bodies.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import hmac
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import grpc

from facade.asgi import Scope
from facade.errors import ApiError
from facade.limits import Subject
from kscope.v1 import keys_pb2, keys_pb2_grpc, usage_pb2_grpc
from kscope_common.limits import Limits
from kscope_common.retry import RECONNECT, Backoff
from kscope_common.tls import ControllerConnection

log = logging.getLogger(__name__)


GRANT_SCOPE_KEY = "kscope.grant"
"""Where the checked grant rides in the ASGI scope, for the model check."""
_UNWATCHED_TTL_S = 1.0
"""How long a cached answer holds while revocations cannot reach us."""
_NEGATIVE_TTL_S = 1.0
"""How long an unknown key is refused without asking the controller again."""
_AUTH_CALL_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Grant:
    """What a request's key allows."""

    owner: str
    models: tuple[str, ...] = ()
    """Names or fnmatch patterns; empty: every model."""
    expires_at: float = float("inf")
    key_id: str = ""
    priority: int = 0
    """The agent's queue serves higher first when the model is contended."""
    subjects: tuple[Subject, ...] = ()
    """The key and owner whose limits apply (only those with limits)."""
    admin: bool = False
    """An admin key: may see other owners' names (/v1/queue/stats)."""

    def allows(self, model: str) -> bool:
        return not self.models or any(fnmatch.fnmatchcase(model, p) for p in self.models)


OPEN = Grant(owner="anonymous")
"""Every request's grant when the facade requires no key."""
STATIC = Grant(owner="static-key")
"""The grant of the --api-key single static key."""


@dataclass
class _Cached:
    grant: Grant | None
    """None: the controller refused this key."""
    checked_at: float


@dataclass(frozen=True)
class PendingCheck:
    """A key the cache cannot answer for: ask the controller (KeyChecker.fetch)."""

    secret: str
    key_hash: str


def _unauthorized(message: str, code: str = "invalid_api_key") -> ApiError:
    return ApiError(401, message, "authentication_error", code=code)


MISSING = _unauthorized("Missing API key: send 'Authorization: Bearer <key>'.", "missing_api_key")
INVALID = _unauthorized("Incorrect API key provided.")
EXPIRED = _unauthorized("The API key has expired.", "expired_api_key")


def model_forbidden(model: str) -> ApiError:
    return ApiError(
        403, f"This API key may not use the model '{model}'.", "permission_error",
        param="model", code="model_not_allowed",
    )  # fmt: skip


def _bearer(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, secret = value.partition(b" ")
            return secret.strip() if scheme.lower() == b"bearer" else b""
    return None


def grant_of(key: keys_pb2.ApiKey) -> Grant:
    """What the controller's answer about a key allows."""
    subjects = [
        Subject(name, Limits.from_proto(limits))
        for name, limits in (
            (f"key:{key.id}", key.limits),
            (f"owner:{key.owner}", key.owner_limits),
        )
    ]
    return Grant(
        owner=key.owner,
        models=tuple(key.models),
        expires_at=key.expires_at.ToNanoseconds() / 1e9,
        key_id=key.id,
        priority=key.priority,
        subjects=tuple(s for s in subjects if s.limits.any),
        admin=key.role == keys_pb2.KEY_ROLE_ADMIN,
    )


class KeyChecker:
    """Answers "may this request go on?" for the /v1 endpoints."""

    def __init__(
        self,
        controller: ControllerConnection,
        static_key: str | None,
        required: bool,
        cache_ttl_s: float,
    ):
        self._static = static_key.encode() if static_key else None
        self.required = required or static_key is not None
        self._ttl_s = cache_ttl_s
        self._cache: dict[str, _Cached] = {}
        self._revoked: set[str] = set()
        self._inflight: dict[str, asyncio.Future[Grant | ApiError]] = {}
        self.watching = False
        self._controller = controller

    @property
    def stub(self) -> keys_pb2_grpc.KeyServiceAsyncStub:
        """The KeyService client on this facade's channel (the portal uses it too)."""
        return keys_pb2_grpc.KeyServiceStub(self._controller.channel())

    @property
    def usage_stub(self) -> usage_pb2_grpc.UsageServiceAsyncStub:
        """The UsageService client on the same channel (the portal's usage page)."""
        return usage_pb2_grpc.UsageServiceStub(self._controller.channel())

    @property
    def _stub(self) -> keys_pb2_grpc.KeyServiceAsyncStub:
        return self.stub

    def check(self, scope: Scope) -> Grant | ApiError | PendingCheck:
        """The grant, the refusal, or a PendingCheck when the controller must be asked."""
        if not self.required:
            return OPEN
        secret = _bearer(scope["headers"])
        if not secret:
            return MISSING
        if self._static is not None and hmac.compare_digest(secret, self._static):
            return STATIC
        if not secret.startswith(b"ks-"):
            return INVALID
        # A dict lookup by hash: the secret itself is never compared byte by byte.
        key_hash = hashlib.sha256(secret).hexdigest()
        if key_hash in self._revoked:
            return INVALID
        cached = self._cache.get(key_hash)
        if cached is not None:
            ttl = self._ttl_s if self.watching else _UNWATCHED_TTL_S
            if cached.grant is None:
                ttl = _NEGATIVE_TTL_S
            if time.monotonic() - cached.checked_at < ttl:
                return self._judge(cached.grant)
        return PendingCheck(secret.decode("latin-1"), key_hash)

    @staticmethod
    def _judge(grant: Grant | None) -> Grant | ApiError:
        if grant is None:
            return INVALID
        if time.time() >= grant.expires_at:
            return EXPIRED
        return grant

    async def fetch(self, pending: PendingCheck) -> Grant | ApiError:
        """Ask the controller about a key; concurrent requests with one key share the call."""
        future = self._inflight.get(pending.key_hash)
        if future is None:
            future = asyncio.ensure_future(self._authenticate(pending))
            self._inflight[pending.key_hash] = future
            future.add_done_callback(lambda _: self._inflight.pop(pending.key_hash, None))
        return await asyncio.shield(future)

    async def _authenticate(self, pending: PendingCheck) -> Grant | ApiError:
        try:
            reply = await self._stub.AuthenticateKey(
                keys_pb2.AuthenticateKeyRequest(secret=pending.secret),
                timeout=_AUTH_CALL_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.UNAUTHENTICATED:
                self._cache[pending.key_hash] = _Cached(None, time.monotonic())
                return EXPIRED if "expired" in (exc.details() or "") else INVALID
            stale = self._cache.get(pending.key_hash)
            log.warning("AuthenticateKey failed: %s", exc.code().name)
            if stale is not None and stale.grant is not None:
                # The controller is unreachable, so nobody can revoke anything
                # meanwhile: the last answer still holds.
                return self._judge(stale.grant)
            return ApiError(
                503, "cannot check the API key right now; retry shortly",
                "service_unavailable_error", code="auth_unavailable", retry_after_s=1,
            )  # fmt: skip
        if pending.key_hash in self._revoked:
            return INVALID
        grant = grant_of(reply.key)
        self._cache[pending.key_hash] = _Cached(grant, time.monotonic())
        return self._judge(grant)

    def revoked(self, key_hashes: Iterable[str]) -> None:
        for key_hash in key_hashes:
            self._revoked.add(key_hash)
            self._cache.pop(key_hash, None)

    def changed(self, key_hashes: Iterable[str], owners: Iterable[str]) -> None:
        """Limits or priorities changed: the next request asks the controller again."""
        for key_hash in key_hashes:
            self._cache.pop(key_hash, None)
        owners = set(owners)
        if owners:
            for key_hash, cached in list(self._cache.items()):
                if cached.grant is not None and cached.grant.owner in owners:
                    del self._cache[key_hash]

    async def watch(self) -> None:
        """Follow WatchKeyEvents forever, reconnecting with backoff."""
        if not self.required:
            return
        backoff = Backoff(RECONNECT)
        while True:
            try:
                async for event in self._stub.WatchKeyEvents(keys_pb2.WatchKeyEventsRequest()):
                    if not self.watching:
                        # Revocations may have been missed while disconnected.
                        self._cache.clear()
                        self.watching = True
                        backoff.reset()
                    self.revoked(event.revoked_key_hashes)
                    self.changed(event.changed_key_hashes, event.changed_owners)
            except grpc.aio.AioRpcError as exc:
                if self.watching:
                    log.warning("key event stream lost: %s", exc.code().name)
            self.watching = False
            await asyncio.sleep(backoff.next_delay())

    async def close(self) -> None:
        """The controller connection is the facade's, closed by its owner."""
        for future in list(self._inflight.values()):
            future.cancel()
