"""Translation between the controller's domain objects and kscope.v1 messages."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from google.protobuf.timestamp_pb2 import Timestamp

from controller.fleet import AgentCommand, DrainCommand, LoadModelCommand, RevokedCommand
from controller.lifecycle import AgentPhase, InstanceState
from controller.records import AgentRecord, HostedState, InstanceRecord
from controller.routes import ModelRoute, ModelState, ModelSummary
from controller.store.telemetry import Record
from kscope.v1 import agent_pb2, control_pb2
from kscope_common.capabilities import Capabilities
from kscope_common.request_stats import RequestTotals

INSTANCE_STATE_TO_PROTO = {
    InstanceState.REQUESTED: control_pb2.INSTANCE_STATE_REQUESTED,
    InstanceState.SUBMITTED: control_pb2.INSTANCE_STATE_SUBMITTED,
    InstanceState.PENDING: control_pb2.INSTANCE_STATE_PENDING,
    InstanceState.STARTING: control_pb2.INSTANCE_STATE_STARTING,
    InstanceState.READY: control_pb2.INSTANCE_STATE_READY,
    InstanceState.DRAINING: control_pb2.INSTANCE_STATE_DRAINING,
    InstanceState.STOPPED: control_pb2.INSTANCE_STATE_STOPPED,
    InstanceState.FAILED: control_pb2.INSTANCE_STATE_FAILED,
}

MODEL_STATE_TO_PROTO = {
    ModelState.COLD: control_pb2.MODEL_STATE_COLD,
    ModelState.STARTING: control_pb2.MODEL_STATE_STARTING,
    ModelState.READY: control_pb2.MODEL_STATE_READY,
}

AGENT_PHASE_FROM_PROTO = {
    agent_pb2.AGENT_PHASE_STARTING: AgentPhase.STARTING,
    agent_pb2.AGENT_PHASE_READY: AgentPhase.READY,
    agent_pb2.AGENT_PHASE_DRAINING: AgentPhase.DRAINING,
    agent_pb2.AGENT_PHASE_FAILED: AgentPhase.FAILED,
}


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    if seconds:
        ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def model_to_proto(
    summary: ModelSummary, capabilities: Capabilities | None = None
) -> control_pb2.Model:
    spec = summary.spec
    model = control_pb2.Model(
        name=spec.name,
        engine=spec.engine.value,
        min_replicas=spec.min_replicas,
        max_replicas=spec.max_replicas,
        state=MODEL_STATE_TO_PROTO[summary.state],
        state_message=summary.message,
        ready_replicas=summary.ready_replicas,
        live_replicas=summary.live_replicas,
        launcher=spec.launcher,
        aliases=spec.aliases,
        lora_adapters=[m.name for m in spec.lora_modules],
    )
    key_limits = spec.key_limits.limits()
    if key_limits.any:  # unset: the facades' fast path
        model.key_limits.CopyFrom(key_limits.to_proto())
    if capabilities is not None:
        model.capabilities.CopyFrom(capabilities.to_proto())
    return model


def route_to_proto(
    route: ModelRoute,
    model_capabilities: Capabilities | None = None,
    instance_capabilities: Callable[[str], Capabilities | None] = lambda _: None,
) -> control_pb2.ModelRoute:
    """A model's route, with what the model and each of its instances can do."""
    endpoints = []
    for e in route.endpoints:
        endpoint = control_pb2.Endpoint(instance_id=e.instance_id, address=e.address)
        caps = instance_capabilities(e.instance_id)
        if caps is not None:
            endpoint.capabilities.CopyFrom(caps.to_proto())
        endpoints.append(endpoint)
    return control_pb2.ModelRoute(
        model=model_to_proto(route.summary, model_capabilities),
        endpoints=endpoints,
        retry_after_seconds=route.summary.retry_after_s,
    )


def instance_to_proto(
    inst: InstanceRecord, agent: AgentRecord | None, capabilities: Capabilities | None = None
) -> control_pb2.Instance:
    message = control_pb2.Instance(
        id=inst.id,
        model=inst.model,
        state=INSTANCE_STATE_TO_PROTO[inst.state],
        reason=inst.reason,
        launcher=inst.launcher,
        launcher_ref=inst.launcher_ref,
        agent_address=inst.agent_address,
        agent_id=inst.agent_id,
        engine_url=inst.engine_url,
        in_flight=agent.in_flight if agent is not None and agent.connected else 0,
        queued=agent.queued if agent is not None and agent.connected else 0,
        queued_by_caller=agent.queued_by_caller if agent is not None and agent.connected else {},
        max_concurrency=agent.max_concurrency if agent is not None else 0,
        max_queue_size=agent.max_queue_size if agent is not None else 0,
        created_at=timestamp(inst.created_at),
        updated_at=timestamp(inst.updated_at),
    )
    if capabilities is not None:
        message.capabilities.CopyFrom(capabilities.to_proto())
    return message


def agent_to_proto(agent: AgentRecord) -> control_pb2.Agent:
    return control_pb2.Agent(
        id=agent.id,
        instance_id=agent.instance_id,
        address=agent.address,
        hostname=agent.hostname,
        models=agent.models,
        engine=agent.engine,
        engine_url=agent.engine_url,
        pid=agent.pid,
        last_report_at=timestamp(agent.last_report_at),
        host_agent=agent.host_agent,
        memory_bytes=agent.memory_bytes,
        hosted_instances=sorted(i for i, h in agent.hosted.items() if h.running),
    )


def hosted_from_proto(
    hosted: Iterable[agent_pb2.HostedInstance],
) -> dict[str, HostedState]:
    return {h.instance_id: HostedState(h.running, h.detail) for h in hosted}


_TELEMETRY_FIELDS = frozenset(control_pb2.TelemetryRecord.DESCRIPTOR.fields_by_name)


def telemetry_to_proto(record: Record) -> control_pb2.TelemetryRecord:
    """The record without the running sums its rates are computed from."""
    return control_pb2.TelemetryRecord(
        **{k: v for k, v in record.flat().items() if k in _TELEMETRY_FIELDS}  # type: ignore[arg-type]
    )


def totals_from_proto(report: agent_pb2.LoadReport) -> RequestTotals:
    return RequestTotals(
        served=report.served,
        errors=report.errors,
        generation_tokens=report.generation_tokens,
        ttft_seconds_sum=report.ttft_seconds_sum,
        ttft_count=report.ttft_count,
        latency_seconds_sum=report.latency_seconds_sum,
    )


def command_to_proto(command: AgentCommand) -> agent_pb2.SessionResponse:
    """A command for an agent's Session stream."""
    if isinstance(command, DrainCommand):
        return agent_pb2.SessionResponse(drain=agent_pb2.DrainCommand(reason=command.reason))
    if isinstance(command, LoadModelCommand):
        spec = command.spec
        load = agent_pb2.LoadModelCommand(
            instance_id=command.instance_id, model=spec.name, engine=spec.engine.value,
            engine_args=list(spec.engine_args), enroll_token=command.enroll_token,
            aliases=spec.aliases, lora_modules=[f"{m.name}={m.path}" for m in spec.lora_modules],
        )  # fmt: skip
        if spec.max_concurrency is not None:
            load.max_concurrency = spec.max_concurrency
        if spec.queue_size is not None:
            load.queue_size = spec.queue_size
        if spec.queue_timeout_s is not None:
            load.queue_timeout_s = spec.queue_timeout_s
        return agent_pb2.SessionResponse(load_model=load)
    if isinstance(command, RevokedCommand):
        return agent_pb2.SessionResponse(
            revoked=agent_pb2.RevokedEnrollments(enrollment_ids=sorted(command.enrollment_ids))
        )
    return agent_pb2.SessionResponse(
        unload_model=agent_pb2.UnloadModelCommand(instance_id=command.instance_id)
    )
