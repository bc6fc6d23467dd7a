"""Load sampling for scaling by load, beside its policy in controller/reconciler.py.

Each reconcile pass samples what every scaled model's load calls for
(reconciler.load_recommendation) and keeps the samples its stabilisation
windows need; reconciler.stabilised turns them into a `Scale`. The samples
live in memory only (see docs/architecture.md, "Scaling by load").
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

from controller.catalog import ModelSpec
from controller.reconciler import Scale, load_recommendation, stabilised
from controller.records import AgentRecord, InstanceRecord

KEEP_MARGIN_S = 5.0
"""Samples are kept this much longer than a model's longest window."""


def live_load(
    model: str, instances: Collection[InstanceRecord], agents: Mapping[str, AgentRecord]
) -> tuple[int, int]:
    """(live instances, requests in flight and queued on them) for `model`, as
    the connected agents of its live instances last reported."""
    live = [i for i in instances if i.model == model and not i.state.ended and not i.stop_requested]
    load = 0
    for inst in live:
        agent = agents.get(inst.agent_id)
        if agent is not None and agent.connected:
            load += agent.in_flight + agent.queued
    return len(live), load


class LoadSamples:
    """Per model with a target_in_flight: (time, instances its load called for),
    oldest first."""

    def __init__(self) -> None:
        self._samples: dict[str, list[tuple[float, int]]] = {}

    def scale_by_load(
        self,
        specs: Iterable[ModelSpec],
        instances: Collection[InstanceRecord],
        agents: Mapping[str, AgentRecord],
        now: float,
    ) -> dict[str, Scale]:
        """Sample each scaled model's load at `now` and return what it calls for
        once stabilised over the model's windows (see reconciler.stabilised)."""
        out: dict[str, Scale] = {}
        for spec in specs:
            if spec.target_in_flight is None:
                continue
            live, load = live_load(spec.name, instances, agents)
            samples = self._samples.setdefault(spec.name, [])
            samples.append((now, load_recommendation(spec, load)))
            keep = max(spec.scale_up_window_s, spec.scale_down_window_s) + KEEP_MARGIN_S
            # Keep one sample older than the longest window: it shows the window is covered.
            while len(samples) > 1 and samples[1][0] <= now - keep:
                samples.pop(0)
            out[spec.name] = stabilised(samples, now, live, spec)
        return out

    def samples(self, model: str) -> list[tuple[float, int]]:
        """A copy of `model`'s samples, oldest first."""
        return list(self._samples.get(model, ()))
