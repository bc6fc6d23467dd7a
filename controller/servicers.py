"""gRPC servicers of the controller: thin translations onto the fleet."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import asdict

import grpc

from controller.convert import (
    AGENT_PHASE_FROM_PROTO,
    agent_to_proto,
    command_to_proto,
    hosted_from_proto,
    instance_to_proto,
    model_to_proto,
    route_to_proto,
    telemetry_to_proto,
    totals_from_proto,
)
from controller.executor import DecisionRecord
from controller.fleet import (
    AgentReport,
    Fleet,
    FleetError,
    Forbidden,
    Invalid,
    NotAuthenticated,
    Refused,
    UnknownEntity,
    check_agent_identity,
)
from controller.lifecycle import AgentPhase
from controller.records import AgentRecord
from controller.store.telemetry import TelemetryStore
from kscope.v1 import agent_pb2, agent_pb2_grpc, control_pb2, control_pb2_grpc
from kscope_common.authz import current_principal
from kscope_common.capabilities import Capabilities

log = logging.getLogger(__name__)

_ROUTE_RESEND_S = 5.0
"""Send the route table again this often even when it did not change: it
refreshes Retry-After hints and shows facades that the stream is alive."""


async def _abort(context: grpc.aio.ServicerContext[object, object], exc: FleetError) -> None:
    code = {
        NotAuthenticated: grpc.StatusCode.PERMISSION_DENIED,
        Forbidden: grpc.StatusCode.PERMISSION_DENIED,
        Invalid: grpc.StatusCode.INVALID_ARGUMENT,
        UnknownEntity: grpc.StatusCode.NOT_FOUND,
        Refused: grpc.StatusCode.FAILED_PRECONDITION,
    }.get(type(exc), grpc.StatusCode.INTERNAL)
    await context.abort(code, str(exc))


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, fleet: Fleet):
        self._fleet = fleet

    async def Register(
        self, request: agent_pb2.RegisterRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> agent_pb2.RegisterResponse:
        principal = current_principal()
        try:
            check_agent_identity(principal.identity, request.instance_id, request.host_agent)
            agent = await self._fleet.register_agent(
                AgentRecord(
                    id="",
                    instance_id=request.instance_id,
                    address=request.address,
                    hostname=request.hostname,
                    models=list(request.models),
                    engine=request.engine,
                    engine_url=request.engine_url,
                    pid=request.pid,
                    host_agent=request.host_agent,
                    memory_bytes=request.memory_bytes,
                    identity=principal.identity.uri if principal.identity else "",
                    capabilities=Capabilities.from_proto(request.capabilities)
                    if request.HasField("capabilities")
                    else None,
                )
            )
        except FleetError as exc:
            await _abort(context, exc)
            raise  # unreachable: abort raises
        return agent_pb2.RegisterResponse(
            agent_id=agent.id,
            report_interval_ms=int(self._fleet.timings.report_interval_s * 1000),
        )

    async def Session(
        self,
        request_iterator: AsyncIterator[agent_pb2.SessionRequest],
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[agent_pb2.SessionResponse]:
        try:
            first = await anext(request_iterator)
        except StopAsyncIteration:
            return
        if first.WhichOneof("message") != "hello":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "first message must be hello")
        agent_id = first.hello.agent_id
        try:
            identity = current_principal().identity
            commands = self._fleet.open_session(agent_id, identity.uri if identity else None)
        except FleetError as exc:
            await _abort(context, exc)
            return
        reader = asyncio.create_task(self._read_reports(agent_id, request_iterator))
        try:
            while True:
                next_command = asyncio.create_task(commands.get())
                done, _ = await asyncio.wait(
                    {next_command, reader}, return_when=asyncio.FIRST_COMPLETED
                )
                if next_command not in done:
                    next_command.cancel()
                    break
                yield command_to_proto(next_command.result())
        finally:
            reader.cancel()
            self._fleet.close_session(agent_id, commands)

    async def _read_reports(
        self, agent_id: str, request_iterator: AsyncIterator[agent_pb2.SessionRequest]
    ) -> None:
        async for message in request_iterator:
            if message.WhichOneof("message") != "load_report":
                continue
            report = message.load_report
            self._fleet.report(
                AgentReport(
                    agent_id=agent_id,
                    phase=AGENT_PHASE_FROM_PROTO.get(report.phase, AgentPhase.STARTING),
                    in_flight=report.in_flight,
                    queued=report.queued,
                    detail=report.detail,
                    totals=totals_from_proto(report),
                    max_concurrency=report.max_concurrency,
                    max_queue_size=report.max_queue_size,
                    hosted=hosted_from_proto(report.hosted) if report.hosted else None,
                    queued_by_caller=dict(report.queued_by_caller),
                    capabilities=Capabilities.from_proto(report.capabilities)
                    if report.HasField("capabilities")
                    else None,
                )
            )


class ControlServicer(control_pb2_grpc.ControlServiceServicer):
    def __init__(
        self,
        fleet: Fleet,
        telemetry: TelemetryStore | None = None,
        decisions: Callable[[], Iterable[DecisionRecord]] = tuple,
    ):
        self._fleet = fleet
        self._telemetry = telemetry
        self._decisions = decisions

    async def ListDecisions(
        self,
        request: control_pb2.ListDecisionsRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> control_pb2.ListDecisionsResponse:
        return control_pb2.ListDecisionsResponse(
            decisions=[
                control_pb2.Decision(**asdict(d))
                for d in reversed(list(self._decisions()))
                if not request.model or d.model == request.model
            ]
        )

    async def GetTelemetry(
        self,
        request: control_pb2.GetTelemetryRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> control_pb2.GetTelemetryResponse:
        if self._telemetry is None:
            return control_pb2.GetTelemetryResponse()
        if request.limit < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "limit must be 0 or more")
        records = await self._telemetry.load(
            request.model, request.include_instances, request.limit
        )
        return control_pb2.GetTelemetryResponse(records=[telemetry_to_proto(r) for r in records])

    async def ListModels(
        self,
        request: control_pb2.ListModelsRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> control_pb2.ListModelsResponse:
        return control_pb2.ListModelsResponse(
            models=[
                model_to_proto(r.summary, self._fleet.model_capabilities(r.summary.spec.name))
                for r in self._fleet.routes()
            ]
        )

    async def ListInstances(
        self,
        request: control_pb2.ListInstancesRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> control_pb2.ListInstancesResponse:
        instances = sorted(self._fleet.instances.values(), key=lambda i: -i.seq)
        return control_pb2.ListInstancesResponse(
            instances=[
                instance_to_proto(
                    i, self._fleet.agents.get(i.agent_id), self._fleet.instance_capabilities(i.id)
                )
                for i in instances
                if (not request.model or i.model == request.model)
                and (request.include_ended or not i.state.ended)
            ]
        )

    async def ListAgents(
        self,
        request: control_pb2.ListAgentsRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> control_pb2.ListAgentsResponse:
        return control_pb2.ListAgentsResponse(
            agents=[agent_to_proto(a) for a in self._fleet.agents.values() if a.connected]
        )

    async def EnsureModel(
        self,
        request: control_pb2.EnsureModelRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> control_pb2.EnsureModelResponse:
        try:
            summary = self._fleet.demand(request.model)
        except FleetError as exc:
            await _abort(context, exc)
            raise
        return control_pb2.EnsureModelResponse(
            model=model_to_proto(summary, self._fleet.model_capabilities(summary.spec.name)),
            retry_after_seconds=summary.retry_after_s,
        )

    async def StopInstance(
        self,
        request: control_pb2.StopInstanceRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> control_pb2.StopInstanceResponse:
        try:
            inst = await self._fleet.request_stop(request.instance_id)
        except FleetError as exc:
            await _abort(context, exc)
            raise
        return control_pb2.StopInstanceResponse(
            instance=instance_to_proto(inst, self._fleet.agents.get(inst.agent_id))
        )

    async def ScaleModel(
        self,
        request: control_pb2.ScaleModelRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> control_pb2.ScaleModelResponse:
        try:
            spec = await self._fleet.scale(
                request.model,
                request.min_replicas if request.HasField("min_replicas") else None,
                request.max_replicas if request.HasField("max_replicas") else None,
            )
        except FleetError as exc:
            await _abort(context, exc)
            raise
        summary = next(r.summary for r in self._fleet.routes() if r.summary.spec.name == spec.name)
        return control_pb2.ScaleModelResponse(
            model=model_to_proto(summary),
            min_replicas=spec.min_replicas,
            max_replicas=spec.max_replicas,
        )

    async def WatchRoutes(
        self,
        request: control_pb2.WatchRoutesRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[control_pb2.WatchRoutesResponse]:
        version = self._fleet.route_version
        while True:
            routes = []
            for route in self._fleet.routes():
                model_caps, instance_caps = self._fleet.route_capabilities(route)
                routes.append(route_to_proto(route, model_caps, instance_caps.get))
            yield control_pb2.WatchRoutesResponse(version=version, routes=routes)
            version = await self._fleet.wait_for_routes(version, _ROUTE_RESEND_S)
