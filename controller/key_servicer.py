"""KeyService: a thin translation of API-key RPCs onto the KeyRegistry."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc

from controller.convert import timestamp
from controller.keys import (
    Caller,
    Forbidden,
    InvalidKeyRequest,
    KeyEvent,
    KeyFailure,
    KeyNotFound,
    KeyRecord,
    KeyRegistry,
    KeyRole,
    NotAuthenticated,
)
from kscope.v1 import keys_pb2, keys_pb2_grpc
from kscope_common.authz import bearer as metadata_bearer
from kscope_common.authz import current_principal
from kscope_common.limits import Limits
from kscope_common.pki import Role

Context = grpc.aio.ServicerContext[object, object]

_ROLE_TO_PROTO = {KeyRole.USER: keys_pb2.KEY_ROLE_USER, KeyRole.ADMIN: keys_pb2.KEY_ROLE_ADMIN}
_CODES = {
    NotAuthenticated: grpc.StatusCode.UNAUTHENTICATED,
    Forbidden: grpc.StatusCode.PERMISSION_DENIED,
    KeyNotFound: grpc.StatusCode.NOT_FOUND,
    InvalidKeyRequest: grpc.StatusCode.INVALID_ARGUMENT,
}


def key_to_proto(key: KeyRecord) -> keys_pb2.ApiKey:
    return keys_pb2.ApiKey(
        id=key.id,
        owner=key.owner,
        name=key.name,
        role=_ROLE_TO_PROTO[key.role],
        models=list(key.models),
        created_at=timestamp(key.created_at),
        expires_at=timestamp(key.expires_at),
        revoked=key.revoked,
        prefix=key.prefix,
        limits=key.limits.to_proto(),
        priority=key.priority,
    )


def _limits(message: keys_pb2.Limits) -> Limits:
    try:
        return Limits.from_proto(message)
    except ValueError as exc:
        raise InvalidKeyRequest(str(exc)) from exc


def bearer(context: Context) -> str:
    """The credential in the call's `authorization: Bearer …` metadata, or ''."""
    return metadata_bearer(context.invocation_metadata())


async def _abort(context: Context, exc: KeyFailure) -> None:
    await context.abort(_CODES.get(type(exc), grpc.StatusCode.INTERNAL), str(exc))


S = TypeVar("S")
Req = TypeVar("Req")
Resp = TypeVar("Resp")


def key_failures_abort(
    method: Callable[[S, Req, Context], Awaitable[Resp]],
) -> Callable[[S, Req, Context], Awaitable[Resp]]:
    """A unary RPC whose KeyFailure ends the call with its status and message."""

    @functools.wraps(method)
    async def answered(self: S, request: Req, context: Context) -> Resp:
        try:
            return await method(self, request, context)
        except KeyFailure as exc:
            await _abort(context, exc)
            raise

    return answered


async def caller_of(keys: KeyRegistry, context: Context) -> Caller:
    """Who calls: the holder of the bearer key, or an operator by certificate."""
    credential = bearer(context)
    identity = current_principal().identity
    if not credential and identity is not None and identity.role is Role.OPERATOR:
        # An operator certificate has an admin key's rights.
        return Caller(owner=f"operator:{identity.name}", admin=True)
    return await keys.caller(credential)


class KeyServicer(keys_pb2_grpc.KeyServiceServicer):
    def __init__(self, registry: KeyRegistry):
        self._keys = registry

    async def _caller(self, context: Context) -> Caller:
        return await caller_of(self._keys, context)

    @key_failures_abort
    async def CreateKey(
        self, request: keys_pb2.CreateKeyRequest, context: Context
    ) -> keys_pb2.CreateKeyResponse:
        role = KeyRole.ADMIN if request.role == keys_pb2.KEY_ROLE_ADMIN else KeyRole.USER
        key, secret = await self._keys.create(
            await self._caller(context),
            request.owner,
            request.name,
            float(request.expires_in_seconds),
            tuple(request.models),
            role,
            _limits(request.limits),
            request.priority,
        )
        return keys_pb2.CreateKeyResponse(key=key_to_proto(key), secret=secret)

    @key_failures_abort
    async def ListKeys(
        self, request: keys_pb2.ListKeysRequest, context: Context
    ) -> keys_pb2.ListKeysResponse:
        keys = await self._keys.list_keys(
            await self._caller(context), request.owner, request.include_revoked
        )
        return keys_pb2.ListKeysResponse(keys=[key_to_proto(k) for k in keys])

    @key_failures_abort
    async def RevokeKey(
        self, request: keys_pb2.RevokeKeyRequest, context: Context
    ) -> keys_pb2.RevokeKeyResponse:
        key = await self._keys.revoke(await self._caller(context), request.key_id)
        return keys_pb2.RevokeKeyResponse(key=key_to_proto(key))

    @key_failures_abort
    async def AuthenticateKey(
        self, request: keys_pb2.AuthenticateKeyRequest, context: Context
    ) -> keys_pb2.AuthenticateKeyResponse:
        key = await self._keys.authenticate(request.secret)
        message = key_to_proto(key)
        message.owner_limits.CopyFrom((await self._keys.owner_limits(key.owner)).to_proto())
        return keys_pb2.AuthenticateKeyResponse(key=message, key_hash=key.key_hash)

    @key_failures_abort
    async def UpdateKey(
        self, request: keys_pb2.UpdateKeyRequest, context: Context
    ) -> keys_pb2.UpdateKeyResponse:
        key = await self._keys.update(
            await self._caller(context),
            request.key_id,
            _limits(request.limits) if request.HasField("limits") else None,
            request.priority if request.HasField("priority") else None,
        )
        return keys_pb2.UpdateKeyResponse(key=key_to_proto(key))

    @key_failures_abort
    async def SetOwnerLimits(
        self, request: keys_pb2.SetOwnerLimitsRequest, context: Context
    ) -> keys_pb2.SetOwnerLimitsResponse:
        limits = await self._keys.set_owner_limits(
            await self._caller(context), request.owner, _limits(request.limits)
        )
        return keys_pb2.SetOwnerLimitsResponse(
            owner_limits=keys_pb2.OwnerLimits(owner=request.owner, limits=limits.to_proto())
        )

    @key_failures_abort
    async def ListOwnerLimits(
        self, request: keys_pb2.ListOwnerLimitsRequest, context: Context
    ) -> keys_pb2.ListOwnerLimitsResponse:
        owners = await self._keys.list_owner_limits(await self._caller(context))
        return keys_pb2.ListOwnerLimitsResponse(
            owners=[
                keys_pb2.OwnerLimits(owner=o, limits=limits.to_proto())
                for o, limits in owners.items()
            ]
        )

    async def WatchKeyEvents(
        self, request: keys_pb2.WatchKeyEventsRequest, context: Context
    ) -> AsyncIterator[keys_pb2.WatchKeyEventsResponse]:
        queue = self._keys.watch()
        try:
            # An empty first message tells the facade the stream is live.
            yield keys_pb2.WatchKeyEventsResponse()
            while True:
                event = KeyEvent()
                event.merge(await queue.get())
                while not queue.empty():
                    event.merge(queue.get_nowait())
                yield keys_pb2.WatchKeyEventsResponse(
                    revoked_key_hashes=event.revoked,
                    changed_key_hashes=event.changed,
                    changed_owners=event.owners,
                )
        finally:
            self._keys.unwatch(queue)
