"""API keys: random secrets shown once, stored as SHA-256 hashes.

A secret is `ks-` plus 32 random bytes (base64url). With that much entropy a
plain SHA-256 is the right hash (no salt or slow KDF needed: nobody can
brute-force 256 bits), and it lets facades and the controller find a key by
its hash in one lookup. Comparisons of hashes use hmac.compare_digest, so the
time a check takes does not depend on how much of a guess matches.

Domain code only: the gRPC servicer (controller/key_servicer.py) translates.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import hmac
import logging
import os
import secrets
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from controller.store.keys import KeyStore

log = logging.getLogger(__name__)

SECRET_PREFIX = "ks-"
_PREFIX_SHOWN = 8
"""Characters of the secret kept in clear ("ks-AbCdE"), so people can tell keys apart."""


class KeyRole(StrEnum):
    USER = "user"
    """Inference, and managing the owner's own keys."""
    ADMIN = "admin"
    """Everything, for every owner."""


def new_secret() -> str:
    """A fresh secret: `ks-` and 256 random bits."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    """SHA-256 of the secret, hex: what the store and the facades keep."""
    return hashlib.sha256(secret.encode()).hexdigest()


def model_allowed(patterns: tuple[str, ...], model: str) -> bool:
    """True when `model` matches one of the patterns (names or fnmatch); no patterns: any."""
    return not patterns or any(fnmatch.fnmatchcase(model, p) for p in patterns)


@dataclass(frozen=True)
class KeyRecord:
    """One API key as stored; the secret itself is never kept."""

    id: str
    key_hash: str
    prefix: str
    owner: str
    name: str
    role: KeyRole
    models: tuple[str, ...]
    created_at: float
    expires_at: float
    revoked: bool = False

    def expired(self, now: float) -> bool:
        return now >= self.expires_at


@dataclass(frozen=True)
class Caller:
    """Who calls a key-management RPC."""

    owner: str
    admin: bool


class KeyFailure(Exception):
    """Base of the key errors; the message is safe to show (it never holds a secret)."""


class NotAuthenticated(KeyFailure):
    """Missing, unknown, expired or revoked credential."""


class Forbidden(KeyFailure):
    """Authenticated, but not allowed to do this."""


class KeyNotFound(KeyFailure):
    """No key with that id (or not one the caller may see)."""


class InvalidKeyRequest(KeyFailure):
    """A malformed request (empty owner, negative lifetime …)."""


class KeyRegistry:
    """Creates, lists, revokes and checks keys; tells watchers about revocations."""

    def __init__(
        self,
        store: KeyStore,
        registration_token: str,
        default_ttl_s: float,
        max_ttl_s: float,
    ):
        self._store = store
        self._token = registration_token.encode()
        self.default_ttl_s = default_ttl_s
        self.max_ttl_s = max_ttl_s
        self._watchers: set[asyncio.Queue[list[str]]] = set()

    # --- who is calling ----------------------------------------------------------------------

    async def caller(self, credential: str) -> Caller:
        """The caller behind a bearer credential: the registration token is an admin."""
        if not credential:
            raise NotAuthenticated("send 'authorization: Bearer <key>' in the call's metadata")
        if hmac.compare_digest(credential.encode(), self._token):
            return Caller(owner="operator", admin=True)
        key = await self.authenticate(credential)
        return Caller(owner=key.owner, admin=key.role is KeyRole.ADMIN)

    async def authenticate(self, secret: str) -> KeyRecord:
        """The usable key this secret belongs to; NotAuthenticated otherwise."""
        key_hash = hash_secret(secret)
        key = await self._store.by_hash(key_hash)
        # The index lookup already matched; compare again in constant time so no
        # code path depends on a byte-by-byte comparison of attacker input.
        if key is None or not hmac.compare_digest(key.key_hash, key_hash):
            raise NotAuthenticated("unknown API key")
        if key.revoked:
            raise NotAuthenticated("the API key was revoked")
        if key.expired(time.time()):
            raise NotAuthenticated("the API key has expired")
        return key

    # --- management --------------------------------------------------------------------------

    async def create(
        self,
        caller: Caller,
        owner: str,
        name: str,
        expires_in_s: float = 0,
        models: tuple[str, ...] = (),
        role: KeyRole = KeyRole.USER,
    ) -> tuple[KeyRecord, str]:
        """A new key and its secret (returned this once)."""
        owner = owner or caller.owner
        if owner != caller.owner and not caller.admin:
            raise Forbidden("only admins create keys for other owners")
        if role is KeyRole.ADMIN and not caller.admin:
            raise Forbidden("only admins create admin keys")
        if expires_in_s < 0:
            raise InvalidKeyRequest("expires_in_seconds must not be negative")
        ttl = expires_in_s or self.default_ttl_s
        if ttl > self.max_ttl_s:
            raise InvalidKeyRequest(f"a key may live at most {int(self.max_ttl_s)} seconds")
        models = tuple(m.strip() for m in models if m.strip())
        secret = new_secret()
        now = time.time()
        key = KeyRecord(
            id=f"key_{uuid.uuid4().hex[:16]}",
            key_hash=hash_secret(secret),
            prefix=secret[:_PREFIX_SHOWN],
            owner=owner,
            name=name.strip() or "unnamed",
            role=role,
            models=models,
            created_at=now,
            expires_at=now + ttl,
        )
        await self._store.insert(key)
        log.info("key %s created for %s (role %s) by %s", key.id, owner, role, caller.owner)
        return key, secret

    async def list_keys(
        self, caller: Caller, owner: str = "", include_revoked: bool = False
    ) -> list[KeyRecord]:
        if not caller.admin:
            if owner and owner != caller.owner:
                raise Forbidden("only admins list other owners' keys")
            owner = caller.owner
        keys = await self._store.list_keys(owner or None)
        return [k for k in keys if include_revoked or not k.revoked]

    async def revoke(self, caller: Caller, key_id: str) -> KeyRecord:
        key = await self._store.by_id(key_id)
        if key is None or (key.owner != caller.owner and not caller.admin):
            raise KeyNotFound(f"no key {key_id!r}")
        if not key.revoked:
            await self._store.revoke(key_id)
            log.info("key %s of %s revoked by %s", key.id, key.owner, caller.owner)
            for queue in self._watchers:
                queue.put_nowait([key.key_hash])
        return KeyRecord(**{**key.__dict__, "revoked": True})

    # --- revocation events -------------------------------------------------------------------

    def watch(self) -> asyncio.Queue[list[str]]:
        """A queue of revoked key hashes; give it back with unwatch()."""
        queue: asyncio.Queue[list[str]] = asyncio.Queue()
        self._watchers.add(queue)
        return queue

    def unwatch(self, queue: asyncio.Queue[list[str]]) -> None:
        self._watchers.discard(queue)

    def close(self) -> None:
        self._store.close()

    # --- the first admin ---------------------------------------------------------------------

    async def bootstrap_admin(self, path: Path) -> str | None:
        """With no admin key yet, create one and write it (mode 600) to `path`.

        Returns the secret in `path` when it still works, else None. Operators
        can also use the registration token to create admin keys.
        """
        if path.exists():
            secret = path.read_text().strip()
            try:
                await self.authenticate(secret)
                return secret
            except NotAuthenticated:
                return None
        if await self._store.has_admin():
            return None
        operator = Caller(owner="operator", admin=True)
        _, secret = await self.create(
            operator, "admin", "bootstrap", expires_in_s=self.max_ttl_s, role=KeyRole.ADMIN
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        log.info("bootstrap admin key written to %s", path)
        return secret
