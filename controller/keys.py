"""API keys: random secrets shown once, stored as SHA-256 hashes.

A secret is `ks-` plus 32 random bytes (base64url). With that much entropy a
plain SHA-256 is the right hash (no salt or slow KDF needed: nobody can
brute-force 256 bits), and it lets facades and the controller find a key by
its hash in one lookup. Comparisons of hashes use hmac.compare_digest, so the
time a check takes does not depend on how much of a guess matches.

A key can only make keys narrower than itself: a user key gives its children
at most its own models, lifetime and role, and every key made by a key records
that key as its parent and dies with it (revoked with it, and refused once any
ancestor is revoked or expired).

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
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from kscope_common.limits import NONE, Limits

if TYPE_CHECKING:
    from controller.store.keys import KeyStore

log = logging.getLogger(__name__)

SECRET_PREFIX = "ks-"
_PREFIX_SHOWN = 8
"""Characters of the secret kept in clear ("ks-AbCdE"), so people can tell keys apart."""
_PATTERN_CHARS = frozenset("*?[")
MAX_PRIORITY = 100
"""Characters that make a model name an fnmatch pattern rather than one name."""


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
    parent_id: str = ""
    """The key that created this one ('' for none: the bootstrap key, an operator's)."""
    limits: Limits = NONE
    priority: int = 0
    """Larger is served first when a model is contended."""

    def expired(self, now: float) -> bool:
        return now >= self.expires_at


@dataclass(frozen=True)
class Caller:
    """Who calls a key-management RPC.

    Either the holder of an API key (`key`, whose role decides `admin`), or an
    operator known some other way (a TLS certificate): `admin=True`, no key,
    and so no limits and no parent for the keys it makes.
    """

    owner: str
    admin: bool
    key: KeyRecord | None = None
    """The key the caller presented, with its effective expiry (see authenticate)."""

    def __post_init__(self) -> None:
        # Limits on a user's requests come from its key; a user caller without
        # one would be unlimited, so it must not exist.
        if self.key is None and not self.admin:
            raise ValueError("a caller that is not an admin must hold a key")
        if self.key is not None and (
            self.owner != self.key.owner or self.admin != (self.key.role is KeyRole.ADMIN)
        ):
            raise ValueError("the caller's owner and role must be its key's")

    @classmethod
    def holding(cls, key: KeyRecord) -> Caller:
        """The caller who presented `key`."""
        return cls(owner=key.owner, admin=key.role is KeyRole.ADMIN, key=key)


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


def require_models_within(parent: tuple[str, ...], asked: tuple[str, ...]) -> None:
    """Forbidden unless every model `asked` for is one `parent` already allows.

    No models means all models, so a parent with none allows anything. Under a
    parent with a list, the child needs a list of its own, and each entry must
    be one of the parent's patterns as written, or a plain model name (no
    `*?[`) that the parent's patterns match. A different pattern is refused
    even when it looks narrower: whether one pattern covers another is not
    something to decide by guessing.
    """
    if not parent:
        return
    if not asked:
        raise Forbidden(
            "this key is limited to models " + ", ".join(parent) + "; name the models the "
            "new key may use (an empty list means every model)"
        )
    for pattern in asked:
        literal = not _PATTERN_CHARS.intersection(pattern)
        if pattern not in parent and not (literal and model_allowed(parent, pattern)):
            raise Forbidden(f"this key may not grant model {pattern!r}")


def expiry_within(parent: KeyRecord, now: float, ttl: float, explicit: bool) -> float:
    """When a key that `parent` creates expires: `now + ttl`, but never after `parent`.

    A lifetime the client asked for (`explicit`) that would outlive the parent
    is refused, so nobody is handed a shorter key than they think; the default
    lifetime is quietly cut short to end with the parent.
    """
    if now + ttl <= parent.expires_at:
        return now + ttl
    if explicit:
        left = max(0, int(parent.expires_at - now))
        raise Forbidden(
            f"a key may not outlive the key that creates it: ask for at most {left} seconds"
        )
    return parent.expires_at


def limits_within(parent: KeyRecord, asked: Limits, priority: int) -> tuple[Limits, int]:
    """The limits and priority of a key `parent` (a user key) creates.

    A figure the parent limits and the request leaves at 0 is inherited; one
    asked looser than the parent's is refused, as is a priority above it.
    """
    looser = asked.looser_than(parent.limits)
    if looser:
        raise Forbidden(
            "a key may not have looser limits than the key that creates it: "
            + ", ".join(f"{name} at most {getattr(parent.limits, name)}" for name in looser)
        )
    if priority > parent.priority:
        raise Forbidden(
            f"a key may not have a higher priority than its creator ({parent.priority})"
        )
    return asked.within(parent.limits), priority


@dataclass
class KeyEvent:
    """What changed, for the facades (WatchKeyEvents)."""

    revoked: list[str] = field(default_factory=list)
    """Hashes of keys revoked."""
    changed: list[str] = field(default_factory=list)
    """Hashes of keys whose limits or priority changed."""
    owners: list[str] = field(default_factory=list)
    """Owners whose shared limits changed."""

    def merge(self, other: KeyEvent) -> None:
        self.revoked.extend(other.revoked)
        self.changed.extend(other.changed)
        self.owners.extend(other.owners)


class KeyRegistry:
    """Creates, lists, revokes and checks keys; tells watchers what changed."""

    def __init__(self, store: KeyStore, default_ttl_s: float, max_ttl_s: float):
        self._store = store
        self.default_ttl_s = default_ttl_s
        self.max_ttl_s = max_ttl_s
        self._watchers: set[asyncio.Queue[KeyEvent]] = set()
        self._owner_limits: dict[str, Limits] | None = None
        """Every owner's shared limits, read from the store once (a small table)."""

    # --- who is calling ----------------------------------------------------------------------

    async def caller(self, credential: str) -> Caller:
        """The caller behind a bearer credential, which must be an API key."""
        if not credential:
            raise NotAuthenticated("send 'authorization: Bearer <key>' in the call's metadata")
        return Caller.holding(await self.authenticate(credential))

    async def authenticate(self, secret: str) -> KeyRecord:
        """The usable key this secret belongs to; NotAuthenticated otherwise.

        A key is usable while it and every key above it (its parent, the
        parent's parent …) exist, are not revoked and have not expired. The
        record returned carries the effective expiry, the earliest along that
        chain, so whoever caches the answer (a facade) stops at the right time.
        """
        key_hash = hash_secret(secret)
        key = await self._store.by_hash(key_hash)
        # The index lookup already matched; compare again in constant time so no
        # code path depends on a byte-by-byte comparison of attacker input.
        if key is None or not hmac.compare_digest(key.key_hash, key_hash):
            raise NotAuthenticated("unknown API key")
        if key.revoked:
            raise NotAuthenticated("the API key was revoked")
        now = time.time()
        if key.expired(now):
            raise NotAuthenticated("the API key has expired")
        if not key.parent_id:
            return key  # no ancestors: spare the facades' checks a query
        return await self._with_ancestors(key, now)

    async def _with_ancestors(self, key: KeyRecord, now: float) -> KeyRecord:
        """`key` with the earliest expiry of its chain, if every ancestor is usable."""
        ancestors = {a.id: a for a in await self._store.ancestors(key.id)}
        expires_at = key.expires_at
        parent_id = key.parent_id
        while parent_id:
            parent = ancestors.pop(parent_id, None)  # pop: a cycle cannot loop
            if parent is None:
                raise NotAuthenticated("the key that created this API key no longer exists")
            if parent.revoked:
                raise NotAuthenticated("a key this API key was created with was revoked")
            if parent.expired(now):
                raise NotAuthenticated("a key this API key was created with has expired")
            expires_at = min(expires_at, parent.expires_at)
            parent_id = parent.parent_id
        return replace(key, expires_at=expires_at)

    # --- management --------------------------------------------------------------------------

    async def create(
        self,
        caller: Caller,
        owner: str,
        name: str,
        expires_in_s: float = 0,
        models: tuple[str, ...] = (),
        role: KeyRole = KeyRole.USER,
        limits: Limits = NONE,
        priority: int = 0,
    ) -> tuple[KeyRecord, str]:
        """A new key and its secret (returned this once).

        Admins (admin keys, operators) may create any key. A user key creates
        keys only for its own owner, of role user, with models within its own
        (see require_models_within), and expiring no later than itself: a
        lifetime asked for explicitly that would outlive the creating key is
        refused (Forbidden), while the default lifetime is cut short to end
        with it, and names it as parent: it dies with it. Keys an admin makes
        (the portal's, made with its service key, among them) have no parent,
        so retiring an admin key does not take every user's key with it.
        Its limits are no looser, and its priority no higher, than its creator's
        (limits_within); only admins give a priority above 0.
        """
        owner = owner or caller.owner
        if owner != caller.owner and not caller.admin:
            raise Forbidden("only admins create keys for other owners")
        if role is KeyRole.ADMIN and not caller.admin:
            raise Forbidden("only admins create admin keys")
        if expires_in_s < 0:
            raise InvalidKeyRequest("expires_in_seconds must not be negative")
        if priority < 0 or priority > MAX_PRIORITY:
            raise InvalidKeyRequest(f"priority must be between 0 and {MAX_PRIORITY}")
        ttl = expires_in_s or self.default_ttl_s
        if ttl > self.max_ttl_s:
            raise InvalidKeyRequest(f"a key may live at most {int(self.max_ttl_s)} seconds")
        models = tuple(m.strip() for m in models if m.strip())
        now = time.time()
        expires_at = now + ttl
        if not caller.admin and caller.key is not None:
            require_models_within(caller.key.models, models)
            expires_at = expiry_within(caller.key, now, ttl, explicit=expires_in_s > 0)
            limits, priority = limits_within(caller.key, limits, priority)
        secret = new_secret()
        key = KeyRecord(
            id=f"key_{uuid.uuid4().hex[:16]}",
            key_hash=hash_secret(secret),
            prefix=secret[:_PREFIX_SHOWN],
            owner=owner,
            name=name.strip() or "unnamed",
            role=role,
            models=models,
            created_at=now,
            expires_at=expires_at,
            parent_id=caller.key.id if caller.key is not None and not caller.admin else "",
            limits=limits,
            priority=priority,
        )
        await self._store.insert(key)
        log.info(
            "key %s created for %s (role %s) by %s (key %s)",
            key.id, owner, role, caller.owner, key.parent_id or "none",
        )  # fmt: skip
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
        """Revoke the key and, with it, every key made from it (at any depth).

        Watchers hear of each key hash revoked now, in one message.
        """
        key = await self._store.by_id(key_id)
        if key is None or (key.owner != caller.owner and not caller.admin):
            raise KeyNotFound(f"no key {key_id!r}")
        # Run even for a key already revoked: it makes sure no descendant is
        # left live, and reports none twice (only newly revoked keys return).
        revoked = await self._store.revoke_tree(key_id)
        if revoked:
            log.info(
                "key %s of %s revoked by %s, with %d keys made from it",
                key.id, key.owner, caller.owner, sum(k.id != key.id for k in revoked),
            )  # fmt: skip
            self._tell(KeyEvent(revoked=[k.key_hash for k in revoked]))
        return replace(key, revoked=True)

    async def update(
        self, caller: Caller, key_id: str, limits: Limits | None, priority: int | None
    ) -> KeyRecord:
        """Change a key's limits or priority (admins); facades hear of it at once."""
        if not caller.admin:
            raise Forbidden("only admins change a key's limits or priority")
        key = await self._store.by_id(key_id)
        if key is None:
            raise KeyNotFound(f"no key {key_id!r}")
        if priority is not None and not 0 <= priority <= MAX_PRIORITY:
            raise InvalidKeyRequest(f"priority must be between 0 and {MAX_PRIORITY}")
        key = replace(
            key,
            limits=key.limits if limits is None else limits,
            priority=key.priority if priority is None else priority,
        )
        await self._store.update_limits(key)
        log.info("key %s: limits %s, priority %d (by %s)", key.id, key.limits, key.priority,
                 caller.owner)  # fmt: skip
        self._tell(KeyEvent(changed=[key.key_hash]))
        return key

    # --- limits shared by an owner's keys ----------------------------------------------------

    async def _all_owner_limits(self) -> dict[str, Limits]:
        if self._owner_limits is None:
            self._owner_limits = await self._store.owner_limits()
        return self._owner_limits

    async def owner_limits(self, owner: str) -> Limits:
        return (await self._all_owner_limits()).get(owner, NONE)

    async def set_owner_limits(self, caller: Caller, owner: str, limits: Limits) -> Limits:
        if not caller.admin:
            raise Forbidden("only admins set an owner's limits")
        if not owner.strip():
            raise InvalidKeyRequest("owner must not be empty")
        await self._store.set_owner_limits(owner, limits)
        (await self._all_owner_limits())[owner] = limits
        log.info("owner %s: limits %s (by %s)", owner, limits, caller.owner)
        self._tell(KeyEvent(owners=[owner]))
        return limits

    async def list_owner_limits(self, caller: Caller) -> dict[str, Limits]:
        return {
            owner: limits
            for owner, limits in sorted((await self._all_owner_limits()).items())
            if limits.any and (caller.admin or owner == caller.owner)
        }

    # --- events for the facades --------------------------------------------------------------

    def _tell(self, event: KeyEvent) -> None:
        for queue in self._watchers:
            queue.put_nowait(event)

    def watch(self) -> asyncio.Queue[KeyEvent]:
        """A queue of key events; give it back with unwatch()."""
        queue: asyncio.Queue[KeyEvent] = asyncio.Queue()
        self._watchers.add(queue)
        return queue

    def unwatch(self, queue: asyncio.Queue[KeyEvent]) -> None:
        self._watchers.discard(queue)

    def close(self) -> None:
        self._store.close()

    # --- the first admin ---------------------------------------------------------------------

    async def bootstrap_admin(self, path: Path) -> str | None:
        """With no admin key yet, create one and write it (mode 600) to `path`.

        Returns the secret in `path` when it still works, else None. The key
        is made by the operator, not by a key, so it has no parent.
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
