"""IdentityService: a thin translation of enrollment RPCs onto the registry."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from controller.convert import timestamp
from controller.enrollment import (
    EnrollmentKind,
    EnrollmentRecord,
    EnrollmentRefused,
    EnrollmentRegistry,
)
from kscope.v1 import identity_pb2, identity_pb2_grpc
from kscope_common.authz import current_principal
from kscope_common.pki import not_after

Context = grpc.aio.ServicerContext[object, object]

_KIND_TO_PROTO = {
    EnrollmentKind.INSTANCE: identity_pb2.ENROLLMENT_KIND_INSTANCE,
    EnrollmentKind.FACADE: identity_pb2.ENROLLMENT_KIND_FACADE,
    EnrollmentKind.HOST: identity_pb2.ENROLLMENT_KIND_HOST,
    EnrollmentKind.OPERATOR: identity_pb2.ENROLLMENT_KIND_OPERATOR,
}
_KIND_FROM_PROTO = {v: k for k, v in _KIND_TO_PROTO.items()}


def enrollment_to_proto(record: EnrollmentRecord) -> identity_pb2.Enrollment:
    return identity_pb2.Enrollment(
        id=record.id,
        kind=_KIND_TO_PROTO[record.kind],
        name=record.name,
        identity=record.identity.uri,
        created_at=timestamp(record.created_at),
        expires_at=timestamp(record.expires_at) if record.expires_at else None,
        revoked=record.revoked,
        uses=record.uses,
    )


class IdentityServicer(identity_pb2_grpc.IdentityServiceServicer):
    def __init__(
        self, registry: EnrollmentRegistry | None, ca_pem: bytes, mesh_address: Callable[[], str]
    ):
        """`registry` is None in plaintext mode: nothing to enroll for."""
        self._registry = registry
        self._ca_pem = ca_pem.decode()
        self._mesh_address = mesh_address

    async def _need_registry(self, context: Context) -> EnrollmentRegistry:
        if self._registry is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "the controller runs in plaintext mode: there are no certificates",
            )
            raise AssertionError("unreachable")
        return self._registry

    async def Discover(
        self, request: identity_pb2.DiscoverRequest, context: Context
    ) -> identity_pb2.DiscoverResponse:
        return identity_pb2.DiscoverResponse(
            mesh_address=self._mesh_address(),
            ca_certificate_pem=self._ca_pem,
            tls=self._registry is not None,
        )

    async def Enroll(
        self, request: identity_pb2.EnrollRequest, context: Context
    ) -> identity_pb2.EnrollResponse:
        registry = await self._need_registry(context)
        try:
            identity, cert = await registry.enroll(request.token, request.csr_pem.encode())
        except EnrollmentRefused as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
            raise
        return identity_pb2.EnrollResponse(
            certificate_pem=cert.decode(),
            ca_certificate_pem=self._ca_pem,
            identity=identity.uri,
            mesh_address=self._mesh_address(),
            expires_at=timestamp(not_after(cert)),
        )

    async def Renew(
        self, request: identity_pb2.RenewRequest, context: Context
    ) -> identity_pb2.RenewResponse:
        registry = await self._need_registry(context)
        caller = current_principal().identity
        if caller is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "Renew needs a certificate")
            raise AssertionError("unreachable")
        try:
            cert = await registry.renew(caller, request.csr_pem.encode())
        except EnrollmentRefused as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
            raise
        return identity_pb2.RenewResponse(
            certificate_pem=cert.decode(), expires_at=timestamp(not_after(cert))
        )

    async def CreateEnrollment(
        self, request: identity_pb2.CreateEnrollmentRequest, context: Context
    ) -> identity_pb2.CreateEnrollmentResponse:
        registry = await self._need_registry(context)
        kind = _KIND_FROM_PROTO.get(request.kind)
        if kind is None or kind is EnrollmentKind.INSTANCE:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "kind must be facade, host or operator (instances get theirs at launch)",
            )
            raise AssertionError("unreachable")
        try:
            record, token = await registry.create(kind, request.name, request.expires_in_seconds)
        except EnrollmentRefused as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise
        return identity_pb2.CreateEnrollmentResponse(
            enrollment=enrollment_to_proto(record), token=token
        )

    async def ListEnrollments(
        self, request: identity_pb2.ListEnrollmentsRequest, context: Context
    ) -> identity_pb2.ListEnrollmentsResponse:
        registry = await self._need_registry(context)
        records = await registry.list_enrollments(request.include_revoked)
        return identity_pb2.ListEnrollmentsResponse(
            enrollments=[enrollment_to_proto(r) for r in records]
        )

    async def RevokeEnrollment(
        self, request: identity_pb2.RevokeEnrollmentRequest, context: Context
    ) -> identity_pb2.RevokeEnrollmentResponse:
        registry = await self._need_registry(context)
        kind = _KIND_FROM_PROTO.get(request.kind)
        if kind is None:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "kind must be facade, host or operator"
            )
            raise AssertionError("unreachable")
        try:
            records = await registry.revoke(kind, request.name)
        except EnrollmentRefused as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
            raise
        return identity_pb2.RevokeEnrollmentResponse(
            enrollments=[enrollment_to_proto(r) for r in records]
        )
