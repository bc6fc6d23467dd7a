"""The route table the controller pushes to facades, and each model's summary."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from controller.catalog import ModelSpec
from controller.lifecycle import InstanceState
from controller.records import InstanceRecord


class ModelState(StrEnum):
    """A model's state as users see it."""

    COLD = "cold"
    """No instance exists or is on the way."""
    STARTING = "starting"
    """Instances are on the way; none is ready."""
    READY = "ready"
    """At least one instance is ready."""


@dataclass(frozen=True)
class ModelSummary:
    spec: ModelSpec
    state: ModelState
    message: str
    ready_replicas: int
    live_replicas: int
    retry_after_s: int
    """For a model without ready instances: when a client may try again."""


@dataclass(frozen=True)
class Endpoint:
    instance_id: str
    address: str


@dataclass(frozen=True)
class ModelRoute:
    summary: ModelSummary
    endpoints: tuple[Endpoint, ...]


_WAITING = (
    InstanceState.REQUESTED,
    InstanceState.SUBMITTED,
    InstanceState.PENDING,
    InstanceState.STARTING,
)


def summarize(spec: ModelSpec, instances: Sequence[InstanceRecord], now: float) -> ModelSummary:
    """The model's state, in words and numbers, from its instances."""
    ready = [i for i in instances if i.state is InstanceState.READY]
    waiting = [i for i in instances if i.state in _WAITING and not i.stop_requested]
    live = [i for i in instances if not i.state.ended]
    if ready:
        return ModelSummary(spec, ModelState.READY, "ready", len(ready), len(live), 0)
    if waiting:
        oldest = min(waiting, key=lambda i: i.created_at)
        if oldest.state is InstanceState.PENDING:
            retry = pending_retry_after_s(oldest.launcher_expected_start, now, spec)
        else:
            remaining = spec.expected_startup_s - (now - oldest.created_at)
            # Past the usual start time, ask clients to come back soon rather than never.
            retry = max(1, math.ceil(remaining)) if remaining > 0 else 5
        message = f"{oldest.state.value}: {oldest.reason}" if oldest.reason else oldest.state.value
        if oldest.launcher_reason and oldest.launcher_reason not in message:
            message += f"; {oldest.launcher_reason}"  # e.g. "SLURM job 42 is RUNNING on gpu7"
        return ModelSummary(spec, ModelState.STARTING, message, 0, len(live), retry)
    retry = max(1, math.ceil(spec.expected_startup_s))
    return ModelSummary(spec, ModelState.COLD, "no instance running", 0, len(live), retry)


PENDING_RETRY_S = 30
"""Retry-After for a queued job whose scheduler gives no start estimate."""


def pending_retry_after_s(expected_start: float | None, now: float, spec: ModelSpec) -> int:
    """Retry-After for a model whose instance waits in a queue: until the
    scheduler's expected start, plus the model's usual start-up time."""
    if expected_start is None:
        return PENDING_RETRY_S
    return max(1, math.ceil(max(0.0, expected_start - now) + spec.expected_startup_s))


def build_routes(
    specs: Sequence[ModelSpec], instances: Sequence[InstanceRecord], now: float
) -> list[ModelRoute]:
    """One route per catalog model, with its READY instances as endpoints."""
    routes = []
    for spec in specs:
        mine = [i for i in instances if i.model == spec.name]
        endpoints = tuple(
            Endpoint(i.id, i.agent_address)
            for i in mine
            if i.state is InstanceState.READY and i.agent_address
        )
        routes.append(ModelRoute(summarize(spec, mine, now), endpoints))
    return routes
