"""The controller's /metrics: instances, load and decisions, read at scrape time."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import Metric

from controller.executor import Executor
from controller.fleet import Fleet
from controller.lifecycle import InstanceState
from kscope_common.metrics import counter, gauge


def controller_metrics(fleet: Fleet, executor: Executor) -> Iterable[Metric]:
    """Called on the metrics server's thread: it only reads (copies) plain values."""
    instances = list(fleet.instances.values())
    agents = dict(fleet.agents)
    by_state: dict[tuple[str, ...], float] = {}
    for spec in fleet.catalog.models:
        for state in InstanceState:
            if not state.ended:
                by_state[(spec.name, state.value)] = 0
    in_flight: dict[tuple[str, ...], float] = {}
    queued: dict[tuple[str, ...], float] = {}
    for inst in instances:
        if inst.state.ended:
            continue
        by_state[(inst.model, inst.state.value)] = (
            by_state.get((inst.model, inst.state.value), 0) + 1
        )
        agent = agents.get(inst.agent_id)
        key = (inst.model,)
        in_flight[key] = in_flight.get(key, 0) + (agent.in_flight if agent else 0)
        queued[key] = queued.get(key, 0) + (agent.queued if agent else 0)
    yield gauge(
        "kscope_controller_instances",
        "Instances not ended, by model and state.",
        ("model", "state"),
        by_state,
    )
    yield gauge(
        "kscope_controller_in_flight_requests",
        "Requests in flight on each model's instances, as their agents last reported.",
        ("model",),
        in_flight,
    )
    yield gauge(
        "kscope_controller_queued_requests",
        "Requests queued on each model's instances, as their agents last reported.",
        ("model",),
        queued,
    )
    yield gauge(
        "kscope_controller_connected_agents",
        "Agents with an open session.",
        (),
        {(): sum(1 for a in agents.values() if a.connected)},
    )
    yield counter(
        "kscope_controller_instance_failures",
        "Instances that failed (launch error, engine exit, lost agent), by model.",
        ("model",),
        {(m,): n for m, n in dict(fleet.failures).items()},
    )
    yield counter(
        "kscope_controller_decisions",
        "Reconciler decisions carried out.",
        ("model", "action"),
        dict(executor.decisions),
    )
