"""UsageService: a thin translation onto the UsageLedger."""

from __future__ import annotations

import time

import grpc

from controller.convert import timestamp
from controller.key_servicer import Context, caller_of, key_failures_abort
from controller.keys import KeyRegistry
from controller.store.usage import UsageEntry, UsageFilter
from controller.usage import HOUR_S, SubjectLoad, UsageLedger
from kscope.v1 import usage_pb2, usage_pb2_grpc
from kscope_common.authz import current_principal

DEFAULT_SINCE_S = 7 * 86400
_GROUPINGS = {
    usage_pb2.USAGE_GROUPING_UNSPECIFIED: "owner",
    usage_pb2.USAGE_GROUPING_OWNER: "owner",
    usage_pb2.USAGE_GROUPING_KEY: "key",
    usage_pb2.USAGE_GROUPING_MODEL: "model",
    usage_pb2.USAGE_GROUPING_DAY: "day",
    usage_pb2.USAGE_GROUPING_DAY_MODEL: "day_model",
}


def _entry(delta: usage_pb2.UsageDelta) -> UsageEntry:
    return UsageEntry(
        hour=delta.hour - delta.hour % HOUR_S, key_id=delta.key_id, owner=delta.owner,
        model=delta.model, endpoint=delta.endpoint, status=delta.status,
        requests=delta.requests, prompt_tokens=delta.prompt_tokens,
        completion_tokens=delta.completion_tokens, duration_s=delta.duration_seconds,
    )  # fmt: skip


def _load_to_proto(load: SubjectLoad) -> usage_pb2.SubjectLoad:
    return usage_pb2.SubjectLoad(
        subject=load.subject,
        requests_last_minute=load.requests_last_minute,
        tokens_last_minute=load.tokens_last_minute,
        in_flight=load.in_flight,
        tokens_today=load.tokens_today,
    )


class UsageServicer(usage_pb2_grpc.UsageServiceServicer):
    def __init__(self, ledger: UsageLedger, keys: KeyRegistry):
        self._ledger = ledger
        self._keys = keys

    async def ReportUsage(
        self, request: usage_pb2.ReportUsageRequest, context: Context
    ) -> usage_pb2.ReportUsageResponse:
        identity = current_principal().identity
        # A certificate names the facade; only a plaintext (debug) mesh trusts the field.
        facade = identity.name if identity is not None else request.facade or context.peer()
        loads = [
            SubjectLoad(
                load.subject, load.requests_last_minute, load.tokens_last_minute, load.in_flight
            )
            for load in request.loads
        ]
        others = await self._ledger.report(
            facade, [_entry(d) for d in request.deltas], loads, time.time()
        )
        return usage_pb2.ReportUsageResponse(others=[_load_to_proto(o) for o in others])

    @key_failures_abort
    async def QueryUsage(
        self, request: usage_pb2.QueryUsageRequest, context: Context
    ) -> usage_pb2.QueryUsageResponse:
        caller = await caller_of(self._keys, context)
        owner = request.owner
        if not caller.admin:
            if owner and owner != caller.owner:
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED, "only admins read other owners' usage"
                )
            owner = caller.owner
        by = _GROUPINGS.get(request.by)
        if by is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown grouping {request.by}")
            raise AssertionError("unreachable")
        if request.HasField("since"):
            since = request.since.ToSeconds()
        else:
            since = int(time.time()) - DEFAULT_SINCE_S
        since_hour = since - since % HOUR_S
        where = UsageFilter(since_hour, owner, request.key_id, request.model)
        totals = await self._ledger.totals(where, by)
        key_owner = by == "key"
        return usage_pb2.QueryUsageResponse(
            since=timestamp(since_hour),
            rows=[
                usage_pb2.UsageRow(
                    group=t.group,
                    model=t.second if by == "day_model" else "",
                    owner=t.second if key_owner else "",
                    requests=t.requests,
                    errors=t.errors,
                    prompt_tokens=t.prompt_tokens,
                    completion_tokens=t.completion_tokens,
                    duration_seconds=t.duration_s,
                )
                for t in totals
            ],
        )
