"""The reconciler: compare what the catalog wants with what runs, and decide.

`decide` is pure: it takes a snapshot and returns decisions; the executor
carries them out. Every decision carries the reason an operator will read.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from controller.catalog import ModelSpec
from controller.lifecycle import InstanceState


@dataclass(frozen=True)
class InstanceView:
    """What the reconciler needs to know about one instance."""

    id: str
    model: str
    state: InstanceState
    created_seq: int
    """Launch order; larger is newer."""
    process_alive: bool = True
    """The launcher still sees a process or job (or has not looked yet)."""
    stop_requested: bool = False
    stop_sent: bool = False
    """The launcher was already told to stop it."""
    agent_connected: bool = False
    draining_for_s: float = 0.0
    ends_in_s: float | None = None
    """Seconds until its launcher's time limit ends it (a SLURM job); None: never."""
    ready_for_s: float = 0.0
    """Seconds it has been READY (math.inf: since before this controller started)."""
    load: int = 0
    """Requests in flight and queued on it, as its agent last reported."""


@dataclass(frozen=True)
class Launch:
    model: str
    reason: str


@dataclass(frozen=True)
class Drain:
    instance_id: str
    reason: str


@dataclass(frozen=True)
class Stop:
    """Stop through the launcher now, without waiting for a drain."""

    instance_id: str
    reason: str


Decision = Launch | Drain | Stop


ROTATION_SETTLE_S = 2.0
"""How long a replacement is READY before the instance it replaces is drained."""


def wanted_replicas(spec: ModelSpec, demanded: bool, by_load: int = 0) -> int:
    """How many instances the model should have: at least min_replicas, one
    while clients want it, what its load calls for; never above max_replicas."""
    floor = 1 if demanded else 0
    return min(spec.max_replicas, max(spec.min_replicas, floor, by_load))


def load_recommendation(spec: ModelSpec, load: int) -> int:
    """Instances the model's load (in flight and queued, summed over its
    instances) calls for right now; 0 without a target_in_flight."""
    if spec.target_in_flight is None:
        return 0
    return min(spec.max_replicas, math.ceil(load / spec.target_in_flight))


@dataclass(frozen=True)
class Scale:
    """What the load calls for after the stabilisation windows, and why."""

    replicas: int
    reason: str = ""


def stabilised(
    samples: Sequence[tuple[float, int]], now: float, current: int, spec: ModelSpec
) -> Scale:
    """Scale from `current` live instances only when every recommendation of the
    window agrees: up to the smallest of the last scale_up_window_s when all are
    above `current`, down to the largest of the last scale_down_window_s when all
    are below. `samples` are (time, load_recommendation), oldest first; a window
    that the samples do not yet cover (just after a restart) changes nothing."""
    if not samples:
        return Scale(current)
    up = [r for t, r in samples if t >= now - spec.scale_up_window_s]
    if samples[0][0] <= now - spec.scale_up_window_s and up and min(up) > current:
        return Scale(
            min(up),
            f"load called for {min(up)} instances for {spec.scale_up_window_s:.0f}s"
            f" (target {spec.target_in_flight:g} in flight each)",
        )
    down = [r for t, r in samples if t >= now - spec.scale_down_window_s]
    if samples[0][0] <= now - spec.scale_down_window_s and down and max(down) < current:
        return Scale(
            max(down),
            f"load called for at most {max(down)} instances for"
            f" {spec.scale_down_window_s:.0f}s (target {spec.target_in_flight:g} in flight each)",
        )
    return Scale(current)


def launch_backoff_s(consecutive_failures: int) -> float:
    """How long to wait before launching again after this many failures in a row:
    1, 2, 4 … 60 s, so a model that cannot start does not launch in a tight loop."""
    if consecutive_failures <= 0:
        return 0.0
    return float(min(60, 2 ** (consecutive_failures - 1)))


def decide(
    models: Mapping[str, ModelSpec],
    instances: Sequence[InstanceView],
    demanded: Iterable[str],
    drain_timeout_s: float,
    held_back: Iterable[str] = (),
    rotation_lead_s: float = 0.0,
    rotation_settle_s: float = ROTATION_SETTLE_S,
    by_load: Mapping[str, Scale] | None = None,
) -> list[Decision]:
    """Decisions that move the fleet toward the catalog's wish. Models in
    `held_back` are in launch backoff after failures: nothing is launched for them.

    Rotation: a READY instance whose time limit ends within `rotation_lead_s` is
    expiring. It no longer counts toward the wish, so a replacement is launched
    beside it; it is drained once enough replacements have been READY for
    `rotation_settle_s` (time for every facade to learn the new route), so no
    request finds the model without a READY instance. 0 turns rotation off.

    Scaling: `by_load` is what each model's load calls for (see `stabilised`).
    Instances above max_replicas are drained not-ready first; fewer wanted for
    lack of demand or load drains only READY ones, least loaded first, so a job
    still PENDING (capacity on the way) is never cancelled by the idle policy
    and every drain lets in-flight requests finish."""
    held = set(held_back)
    demanded_set = set(demanded)
    decisions: list[Decision] = []
    decisions.extend(_cleanups(instances, drain_timeout_s))
    for inst in instances:
        if inst.model not in models and _counts_as_live(inst):
            decisions.append(Drain(inst.id, f"model {inst.model!r} left the catalog"))
    for name, spec in models.items():
        live = [i for i in instances if i.model == name and _counts_as_live(i)]
        lead = rotation_lead(spec, rotation_lead_s)
        expiring = [i for i in live if _expiring(i, lead)]
        fresh = [i for i in live if not _expiring(i, lead)]
        scale = (by_load or {}).get(name, Scale(0))
        want = wanted_replicas(spec, name in demanded_set, scale.replicas)
        if len(fresh) < want and name not in held:
            failed = sum(
                1 for i in instances if i.model == name and i.state is InstanceState.FAILED
            )
            reason = f"{len(fresh)} of {want} wanted instances"
            if expiring:
                reason += f" ({len(expiring)} more near their time limit)"
            if failed:
                reason += f" ({failed} failed before)"
            if scale.reason and scale.replicas == want:
                reason += f": {scale.reason}"
            decisions.extend(Launch(name, reason) for _ in range(want - len(fresh)))
        elif len(fresh) > want:
            reason = f"{len(fresh)} instances, {want} wanted"
            if scale.reason and scale.replicas == want:
                reason += f": {scale.reason}"
            # Above max_replicas: the least useful first, not-ready ones, then the newest.
            ranked = sorted(fresh, key=lambda i: (i.state is InstanceState.READY, -i.created_seq))
            over_max = ranked[: max(0, len(fresh) - spec.max_replicas)]
            # Below that, only READY ones, least loaded, then newest first.
            ready = sorted(
                (i for i in ranked[len(over_max) :] if i.state is InstanceState.READY),
                key=lambda i: (i.load, -i.created_seq),
            )
            excess = len(fresh) - want - len(over_max)
            for inst in over_max + ready[: max(0, excess)]:
                decisions.append(Drain(inst.id, reason))
        decisions.extend(_retire_expiring(expiring, fresh, want, rotation_settle_s))
    return decisions


def rotation_lead(spec: ModelSpec, lead_s: float) -> float:
    """The model's rotation lead: the configured one, but at most half its time
    limit, so that each job serves at least half its time (a lead as long as
    the limit would replace every job the moment it became ready)."""
    limit = spec.slurm.time_limit_s
    return min(lead_s, limit / 2) if limit else lead_s


def _expiring(inst: InstanceView, lead_s: float) -> bool:
    return (
        lead_s > 0
        and inst.state is InstanceState.READY
        and inst.ends_in_s is not None
        and inst.ends_in_s <= lead_s
    )


def _retire_expiring(
    expiring: Sequence[InstanceView], fresh: Sequence[InstanceView], want: int, settle_s: float
) -> list[Decision]:
    """Drain expiring instances as far as settled READY replacements cover the wish."""
    settled = sum(1 for i in fresh if i.state is InstanceState.READY and i.ready_for_s >= settle_s)
    spare = settled + len(expiring) - want
    soonest_first = sorted(expiring, key=lambda i: i.ends_in_s or 0.0)
    return [
        Drain(i.id, f"time limit in {i.ends_in_s or 0:.0f}s; its replacement is ready")
        for i in soonest_first[: max(0, spare)]
    ]


def _counts_as_live(inst: InstanceView) -> bool:
    return not inst.state.ended and not inst.stop_requested


def _cleanups(instances: Sequence[InstanceView], drain_timeout_s: float) -> list[Decision]:
    out: list[Decision] = []
    for inst in instances:
        if inst.stop_sent or not inst.process_alive:
            continue
        if inst.state is InstanceState.FAILED:
            out.append(Stop(inst.id, "failed instance still has a process"))
        elif inst.state is InstanceState.STOPPED:
            out.append(Stop(inst.id, "stopped instance still has a process"))
        elif inst.stop_requested and not inst.agent_connected:
            out.append(Stop(inst.id, "draining without an agent"))
        elif inst.stop_requested and inst.draining_for_s > drain_timeout_s:
            out.append(Stop(inst.id, f"drain took longer than {drain_timeout_s:.0f}s"))
    return out
