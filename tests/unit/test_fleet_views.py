"""What the fleet's records mean at a moment (controller/fleet_views.py) and the
load samples beside the scaling policy (controller/load_sampling.py): pure
functions of records and a `now` given by the test, no clock and no gRPC."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from controller.catalog import Catalog, ModelSpec
from controller.fleet import AgentReport, Fleet
from controller.fleet_views import (
    DEFAULT_STARTUP_TIMEOUT_S,
    agent_of,
    held_back,
    idle_models,
    instance_facts,
    instance_views,
    next_state,
    route_signature,
)
from controller.lifecycle import AgentPhase, InstanceState, LauncherPhase
from controller.load_sampling import LoadSamples, live_load
from controller.reconciler import Scale
from controller.records import AgentRecord, InstanceRecord
from controller.routes import build_routes
from controller.store.sqlite import SqliteStore
from kscope_common.request_stats import RequestTotals

S = InstanceState
T0 = 1_000_000.0
"""This controller's start, in the tests' own time."""


def spec(name: str = "m", **kw: object) -> ModelSpec:
    return ModelSpec.model_validate({"name": name, "model_path": "/w", "max_replicas": 4, **kw})


def record(id: str = "i1", model: str = "m", seq: int = 1, **kw: object) -> InstanceRecord:
    return InstanceRecord(id=id, model=model, launcher="local", seq=seq, created_at=T0, **kw)  # type: ignore[arg-type]


def agent(id: str = "a1", instance_id: str = "i1", **kw: object) -> AgentRecord:
    return AgentRecord(id=id, instance_id=instance_id, address="10.0.0.1:1", **kw)  # type: ignore[arg-type]


def facts_at(
    inst: InstanceRecord, ag: AgentRecord | None, now: float, model: ModelSpec | None = None
) -> tuple[InstanceState, str]:
    """The state `inst` derives at `now` (stale after 10 s, grace 15 s)."""
    facts = instance_facts(
        inst, ag, model or spec(), now, started_at=T0, agent_stale_after_s=10.0,
        reconnect_grace_s=15.0,
    )  # fmt: skip
    return next_state(inst, facts, T0)


# --- agent_of ----------------------------------------------------------------------------


def test_agent_of_finds_the_registered_agent_and_none_before_registration() -> None:
    agents = {"a1": agent()}
    assert agent_of(record(agent_id="a1"), agents) is agents["a1"]
    assert agent_of(record(), agents) is None
    assert agent_of(record(agent_id="gone"), agents) is None


# --- instance_facts / next_state ---------------------------------------------------------


def test_facts_of_a_reporting_agent() -> None:
    inst = record(agent_id="a1", launcher_ref="42", launcher_phase=LauncherPhase.RUNNING,
                  state=S.STARTING, ever_registered=True)  # fmt: skip
    ag = agent(connected=True, last_report_at=T0 + 95, phase=AgentPhase.READY, detail="ok")
    facts = instance_facts(
        inst, ag, spec(startup_timeout_s=300), T0 + 100, started_at=T0,
        agent_stale_after_s=10.0, reconnect_grace_s=15.0,
    )  # fmt: skip
    assert facts.previous is S.STARTING
    assert facts.submitted
    assert facts.agent_connected and not facts.agent_lost
    assert facts.agent_phase is AgentPhase.READY and facts.agent_detail == "ok"
    assert not facts.awaiting_reconnect and not facts.reconnect_expired
    assert facts.age_s == 100.0
    assert facts.startup_timeout_s == 300.0
    assert next_state(inst, facts, T0) == (S.READY, "engine healthy")


def test_an_agent_silent_past_stale_after_is_lost() -> None:
    inst = record(agent_id="a1", launcher_ref="42", launcher_phase=LauncherPhase.RUNNING,
                  state=S.READY, ever_registered=True)  # fmt: skip
    ag = agent(connected=True, last_report_at=T0 + 100, phase=AgentPhase.READY)
    assert facts_at(inst, ag, T0 + 110) == (S.READY, "engine healthy")  # exactly 10 s: not yet
    state, reason = facts_at(inst, ag, T0 + 110.5)
    assert state is S.FAILED
    assert reason == "agent sent no report for too long"


def test_a_stored_instance_waits_for_its_agent_during_the_grace_only() -> None:
    # Loaded from the store: attached before the restart, its agent not back yet.
    inst = record(agent_id="a1", launcher_ref="42", launcher_phase=LauncherPhase.RUNNING,
                  state=S.READY, ever_registered=True)  # fmt: skip
    during = instance_facts(
        inst, None, spec(), T0 + 14.9, started_at=T0, agent_stale_after_s=10.0,
        reconnect_grace_s=15.0,
    )  # fmt: skip
    assert during.awaiting_reconnect and not during.reconnect_expired
    assert next_state(inst, during, T0) == (S.READY, "waiting for the agent to reconnect")
    assert facts_at(inst, None, T0 + 15.0) == (
        S.FAILED, "agent did not reconnect after a controller restart",
    )  # fmt: skip


def test_an_agent_that_registered_here_is_opening_its_session_not_reconnecting() -> None:
    # A busy controller accepted the Register long after its start, and the
    # Session not yet: the instance keeps starting (it used to FAIL as "did not
    # reconnect after a controller restart" once the grace had passed).
    inst = record(agent_id="a1", launcher_ref="42", launcher_phase=LauncherPhase.RUNNING,
                  state=S.STARTING, ever_registered=True)  # fmt: skip
    ag = agent(connected=False, registered_at=T0 + 60, last_report_at=T0 + 60,
               phase=AgentPhase.STARTING)  # fmt: skip
    facts = instance_facts(
        inst, ag, spec(), T0 + 65, started_at=T0, agent_stale_after_s=10.0,
        reconnect_grace_s=15.0,
    )  # fmt: skip
    assert not facts.awaiting_reconnect and not facts.reconnect_expired and not facts.agent_lost
    assert facts_at(inst, ag, T0 + 65)[0] is S.STARTING
    # A Session that never opens: lost after agent_stale_after_s.
    assert facts_at(inst, ag, T0 + 70.5) == (
        S.FAILED, "agent registered but never opened its session",
    )  # fmt: skip


def test_a_lost_session_is_not_a_reconnect_window() -> None:
    broke = "agent lost: its session with the controller broke"
    inst = record(agent_id="a1", launcher_ref="42", launcher_phase=LauncherPhase.RUNNING,
                  state=S.READY, ever_registered=True, agent_lost=True,
                  agent_lost_reason=broke)  # fmt: skip
    ag = agent(connected=False, phase=AgentPhase.READY)
    assert facts_at(inst, ag, T0 + 1) == (S.FAILED, broke)


def test_startup_timeout_comes_from_the_spec_or_the_default() -> None:
    inst = record(launcher_ref="42", launcher_phase=LauncherPhase.RUNNING, state=S.STARTING)
    assert facts_at(inst, None, T0 + 59, spec(startup_timeout_s=60))[0] is S.STARTING
    assert facts_at(inst, None, T0 + 61, spec(startup_timeout_s=60)) == (
        S.FAILED, "not ready within 60s of launch",
    )  # fmt: skip
    orphan = instance_facts(
        inst, None, None, T0 + 61, started_at=T0, agent_stale_after_s=10.0,
        reconnect_grace_s=15.0,
    )  # fmt: skip
    assert orphan.startup_timeout_s == DEFAULT_STARTUP_TIMEOUT_S == 900.0


def test_a_failed_instance_learns_its_launchers_reason_once() -> None:
    failed = record(state=S.FAILED, reason="agent lost: its session with the controller broke",
                    launcher_ref="42", launcher_phase=LauncherPhase.ENDED,
                    launcher_reason="SLURM job 42 ended: TIMEOUT", updated_at=T0 + 5)  # fmt: skip
    assert facts_at(failed, None, T0 + 6) == (
        S.FAILED,
        "agent lost: its session with the controller broke; SLURM job 42 ended: TIMEOUT",
    )
    # Already said: the reason stays (an empty reason keeps the one it has).
    said = replace(failed, reason=f"{failed.reason}; {failed.launcher_reason}")
    assert facts_at(said, None, T0 + 6) == (S.FAILED, "")
    # Failed before this controller started: not its news to add.
    old = replace(failed, updated_at=T0 - 1)
    assert facts_at(old, None, T0 + 6) == (S.FAILED, "")


# --- instance_views ----------------------------------------------------------------------


def test_views_of_records() -> None:
    ready = record("r", seq=2, agent_id="a1", state=S.READY, launcher_ref="42",
                   launcher_phase=LauncherPhase.RUNNING, launcher_ends_at=T0 + 500,
                   ready_at=T0 + 40)  # fmt: skip
    draining = record("d", seq=1, state=S.DRAINING, launcher_ref="41", stop_requested=True,
                      stop_requested_at=T0 + 90, stop_sent=True,
                      launcher_phase=LauncherPhase.PENDING, launcher_ends_at=T0 + 500)  # fmt: skip
    requested = record("q", seq=3)
    ended = record("e", seq=0, state=S.FAILED, launcher_ref="40",
                   launcher_phase=LauncherPhase.ENDED)  # fmt: skip
    agents = {"a1": agent(connected=True, in_flight=3, queued=2)}

    r, d, q, e = instance_views([ready, draining, requested, ended], agents, T0 + 100)

    assert (r.id, r.model, r.state, r.created_seq) == ("r", "m", S.READY, 2)
    assert r.process_alive and r.agent_connected
    assert r.ends_in_s == 400.0
    assert r.ready_for_s == 60.0
    assert r.load == 5
    assert not r.stop_requested and r.draining_for_s == 0.0
    assert d.stop_requested and d.stop_sent and d.draining_for_s == 10.0
    assert d.ends_in_s is None  # only a RUNNING job's time limit counts
    assert not d.agent_connected and d.load == 0
    assert d.ready_for_s == math.inf  # READY before this controller's time, or never seen
    assert not q.process_alive  # nothing launched yet
    assert not e.process_alive  # its process ended


# --- held_back ---------------------------------------------------------------------------


def test_a_model_is_held_back_while_the_backoff_of_its_failure_streak_runs() -> None:
    instances = [
        record("old", seq=1, state=S.READY),
        record("f1", seq=2, state=S.FAILED, updated_at=T0 + 10),
        record("f2", seq=3, state=S.FAILED, updated_at=T0 + 20),
    ]
    # Two failures in a row: 2 s from the newest one.
    assert held_back([spec()], instances, T0 + 21.9) == ["m"]
    assert held_back([spec()], instances, T0 + 22.0) == []


def test_a_success_after_failures_ends_the_streak() -> None:
    instances = [
        record("f1", seq=1, state=S.FAILED, updated_at=T0),
        record("ok", seq=2, state=S.STARTING, updated_at=T0),
    ]
    assert held_back([spec(), spec("other")], instances, T0 + 0.5) == []


def test_the_backoff_grows_with_the_streak_up_to_a_minute() -> None:
    instances = [record(f"f{n}", seq=n, state=S.FAILED, updated_at=T0) for n in range(1, 11)]
    assert held_back([spec()], instances, T0 + 59.9) == ["m"]
    assert held_back([spec()], instances, T0 + 60.0) == []
    assert held_back([spec("other")], instances, T0) == []


# --- idle_models -------------------------------------------------------------------------


def test_idle_models() -> None:
    specs = {
        "idle": spec("idle", idle_timeout_s=60),
        "busy": spec("busy", idle_timeout_s=60),
        "starting": spec("starting", idle_timeout_s=60),
        "forever": spec("forever"),
    }
    instances = [
        record("i", model="idle", agent_id="ai", state=S.READY),
        record("b", model="busy", agent_id="ab", state=S.READY),
        record("s", model="starting", state=S.STARTING),
        record("x", model="idle", state=S.STARTING, stop_requested=True),  # draining: ignored
        record("f", model="forever", agent_id="af", state=S.READY),
    ]
    agents = {
        "ai": agent("ai", "i", last_busy_at=T0 + 10),
        "ab": agent("ab", "b", last_busy_at=T0 + 50),
        "af": agent("af", "f", last_busy_at=T0),
    }
    demanded_at = {"idle": T0, "busy": T0, "starting": T0, "forever": T0}
    demanded = ["idle", "busy", "starting", "forever", "not-in-catalog"]

    assert idle_models(demanded, demanded_at, specs, instances, agents, T0 + 70) == {"idle": 60.0}
    assert idle_models(demanded, demanded_at, specs, instances, agents, T0 + 69) == {}
    # A new EnsureModel makes it busy again.
    again = {**demanded_at, "idle": T0 + 65}
    assert idle_models(demanded, again, specs, instances, agents, T0 + 70) == {}
    # Only demanded models can lapse.
    assert idle_models(["busy"], demanded_at, specs, instances, agents, T0 + 200) == {"busy": 150.0}


def test_a_ready_instance_without_a_report_of_work_is_busy_from_now() -> None:
    specs = {"m": spec(idle_timeout_s=60)}
    instances = [record(agent_id="a1", state=S.READY)]
    never = {"a1": agent(last_busy_at=0.0)}
    assert idle_models(["m"], {}, specs, instances, never, T0 + 1000) == {}


# --- route_signature ---------------------------------------------------------------------


def test_route_signature_changes_only_with_what_facades_see() -> None:
    ready = record(state=S.READY, agent_address="10.0.0.1:1", reason="engine healthy")
    before = route_signature(build_routes([spec()], [ready], T0))
    # Time alone (a READY model's summary does not depend on it) changes nothing.
    assert route_signature(build_routes([spec()], [ready], T0 + 100)) == before
    moved = replace(ready, agent_address="10.0.0.2:1")
    assert route_signature(build_routes([spec()], [moved], T0)) != before
    draining = replace(ready, state=S.DRAINING)
    assert route_signature(build_routes([spec()], [draining], T0)) != before


# --- load sampling -----------------------------------------------------------------------


def test_live_load_counts_connected_agents_of_live_instances() -> None:
    instances = [
        record("a", agent_id="aa", state=S.READY),
        record("b", agent_id="ab", state=S.STARTING),
        record("c", agent_id="ac", state=S.READY),  # its agent's session is gone
        record("d", agent_id="ad", state=S.READY, stop_requested=True),  # draining
        record("e", agent_id="ae", state=S.FAILED),
        record("o", model="other", agent_id="ao", state=S.READY),
    ]
    agents = {
        "aa": agent("aa", "a", connected=True, in_flight=4, queued=1),
        "ab": agent("ab", "b", connected=True, in_flight=0, queued=2),
        "ac": agent("ac", "c", connected=False, in_flight=9),
        "ad": agent("ad", "d", connected=True, in_flight=9),
        "ae": agent("ae", "e", connected=True, in_flight=9),
        "ao": agent("ao", "o", connected=True, in_flight=9),
    }
    assert live_load("m", instances, agents) == (3, 7)
    assert live_load("none", instances, agents) == (0, 0)


def test_load_scales_up_once_the_window_agrees() -> None:
    scaled = spec(target_in_flight=2, scale_up_window_s=10, scale_down_window_s=30)
    instances = [record(agent_id="a1", state=S.READY)]
    agents = {"a1": agent(connected=True, in_flight=5, queued=1)}  # 6 / 2: 3 instances
    samples = LoadSamples()

    first = samples.scale_by_load([scaled, spec("fixed")], instances, agents, T0)
    assert first == {"m": Scale(1)}  # the window is not covered yet; no target: no entry
    assert samples.scale_by_load([scaled], instances, agents, T0 + 5) == {"m": Scale(1)}
    up = samples.scale_by_load([scaled], instances, agents, T0 + 10)["m"]
    assert up.replicas == 3
    assert up.reason == "load called for 3 instances for 10s (target 2 in flight each)"
    assert samples.samples("m") == [(T0, 3), (T0 + 5, 3), (T0 + 10, 3)]
    assert samples.samples("fixed") == []


def test_load_scales_down_only_after_the_down_window() -> None:
    scaled = spec(target_in_flight=2, scale_up_window_s=10, scale_down_window_s=30)
    instances = [record(f"i{n}", seq=n, agent_id=f"a{n}", state=S.READY) for n in (1, 2)]
    quiet = {f"a{n}": agent(f"a{n}", f"i{n}", connected=True) for n in (1, 2)}
    samples = LoadSamples()
    for t in (0, 10, 20):
        assert samples.scale_by_load([scaled], instances, quiet, T0 + t)["m"] == Scale(2)
    down = samples.scale_by_load([scaled], instances, quiet, T0 + 30)["m"]
    assert down.replicas == 0
    assert "at most 0 instances for 30s" in down.reason


def test_samples_older_than_the_longest_window_are_dropped_but_one() -> None:
    scaled = spec(target_in_flight=2, scale_up_window_s=10, scale_down_window_s=20)
    samples = LoadSamples()
    for t in range(0, 60, 5):
        samples.scale_by_load([scaled], [], {}, T0 + t)
    # Kept for 20 + 5 s: one sample at or before T0+55-25 shows the window is covered.
    assert [t - T0 for t, _ in samples.samples("m")] == [30, 35, 40, 45, 50, 55]


# --- the fleet applies them --------------------------------------------------------------


async def test_the_fleet_judges_by_the_now_it_is_given(tmp_path: Path) -> None:
    """A real store, a clock that stands still at T0, and the `now` of one pass."""
    store = SqliteStore(tmp_path / "state.db")
    fleet = Fleet(store, Catalog(models=(spec(),)), clock=lambda: T0)
    inst = await fleet.create_instance(spec())
    await fleet.record_launch(inst.id, "pid-1")
    fleet.observe_launcher(inst.id, LauncherPhase.RUNNING, "")
    registered = await fleet.register_agent(agent("", inst.id))
    fleet.open_session(registered.id, None)
    fleet.report(
        AgentReport(registered.id, AgentPhase.READY, in_flight=1, queued=0, detail="ok",
                    totals=RequestTotals())
    )  # fmt: skip

    await fleet.refresh(T0 + 5)
    assert fleet.instances[inst.id].state is S.READY
    assert fleet.instances[inst.id].ready_at == T0 + 5
    assert fleet.agents[registered.id].last_busy_at == T0
    # The agent's last report was at T0 (the fleet's clock): stale 10 s later.
    await fleet.refresh(T0 + 10.5)
    assert fleet.instances[inst.id].state is S.FAILED
    assert fleet.failures == {"m": 1}
    # Saved by the fleet's clock (T0): one failure holds the model back 1 s from then.
    assert fleet.instances[inst.id].updated_at == T0
    records = list(fleet.instances.values())
    assert held_back(fleet.catalog.models, records, T0 + 0.9) == ["m"]
    assert held_back(fleet.catalog.models, records, T0 + 1) == []
    store.close()


async def test_other_modules_cannot_change_the_fleets_dicts(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state.db")
    fleet = Fleet(store, Catalog(models=(spec(),)), clock=lambda: T0)
    inst = await fleet.create_instance(spec())
    with pytest.raises(TypeError):
        fleet.instances["x"] = inst  # type: ignore[index]
    with pytest.raises(TypeError):
        fleet.failures["m"] = 1  # type: ignore[index]
    await fleet.record_launch_error(inst.id, "no launcher")
    await fleet.refresh(T0)
    assert fleet.instances[inst.id].state is S.FAILED
    assert fleet.instances[inst.id].reason == "launch failed: no launcher"
    store.close()
