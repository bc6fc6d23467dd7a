"""Every decision the reconciler can make, from snapshots."""

from __future__ import annotations

from controller.catalog import ModelSpec
from controller.lifecycle import InstanceState
from controller.reconciler import (
    Drain,
    InstanceView,
    Launch,
    Scale,
    Stop,
    decide,
    load_recommendation,
    rotation_lead,
    stabilised,
    wanted_replicas,
)

S = InstanceState


def spec(name: str = "m", min_replicas: int = 0, max_replicas: int = 2) -> ModelSpec:
    return ModelSpec(
        name=name, model_path="/w", min_replicas=min_replicas, max_replicas=max_replicas
    )


def inst(
    id: str, state: InstanceState, seq: int = 1, model: str = "m", **kw: object
) -> InstanceView:
    return InstanceView(id=id, model=model, state=state, created_seq=seq, **kw)  # type: ignore[arg-type]


def test_wanted_replicas() -> None:
    assert wanted_replicas(spec(min_replicas=0), demanded=False) == 0
    assert wanted_replicas(spec(min_replicas=0), demanded=True) == 1
    assert wanted_replicas(spec(min_replicas=2, max_replicas=2), demanded=False) == 2
    assert wanted_replicas(spec(min_replicas=0, max_replicas=1), demanded=True) == 1


def test_cold_model_without_demand_stays_cold() -> None:
    assert decide({"m": spec()}, [], demanded=[], drain_timeout_s=60) == []


def test_demand_launches_exactly_one() -> None:
    assert decide({"m": spec()}, [], demanded=["m"], drain_timeout_s=60) == [
        Launch("m", "0 of 1 wanted instances")
    ]


def test_min_replicas_launches_up_to_min() -> None:
    decisions = decide({"m": spec(min_replicas=2)}, [], demanded=[], drain_timeout_s=60)
    assert decisions == [Launch("m", "0 of 2 wanted instances")] * 2


def test_instances_on_the_way_count_as_capacity() -> None:
    for state in (S.REQUESTED, S.SUBMITTED, S.PENDING, S.STARTING, S.READY):
        assert decide({"m": spec()}, [inst("a", state)], demanded=["m"], drain_timeout_s=60) == []


def test_failed_instance_is_replaced_and_cleaned_up() -> None:
    decisions = decide(
        {"m": spec()}, [inst("a", S.FAILED, process_alive=True)], demanded=["m"], drain_timeout_s=60
    )
    assert Stop("a", "failed instance still has a process") in decisions
    assert Launch("m", "0 of 1 wanted instances (1 failed before)") in decisions


def test_failed_instance_without_process_needs_no_stop() -> None:
    decisions = decide(
        {"m": spec()}, [inst("a", S.FAILED, process_alive=False)], demanded=[], drain_timeout_s=60
    )
    assert decisions == []


def test_stopped_instance_with_a_process_is_stopped() -> None:
    decisions = decide({"m": spec()}, [inst("a", S.STOPPED)], demanded=[], drain_timeout_s=60)
    assert decisions == [Stop("a", "stopped instance still has a process")]


def test_stop_is_sent_once() -> None:
    decisions = decide(
        {"m": spec()}, [inst("a", S.FAILED, stop_sent=True)], demanded=[], drain_timeout_s=60
    )
    assert decisions == []


def test_excess_instances_drain_not_ready_and_newest_first() -> None:
    instances = [
        inst("old-ready", S.READY, seq=1),
        inst("new-ready", S.READY, seq=3),
        inst("starting", S.STARTING, seq=2),
    ]
    decisions = decide(
        {"m": spec(min_replicas=1, max_replicas=1)}, instances, demanded=[], drain_timeout_s=60
    )
    assert decisions == [
        Drain("starting", "3 instances, 1 wanted"),
        Drain("new-ready", "3 instances, 1 wanted"),
    ]


def test_draining_instances_do_not_count_as_live() -> None:
    instances = [inst("a", S.DRAINING, stop_requested=True, agent_connected=True)]
    assert decide({"m": spec()}, instances, demanded=["m"], drain_timeout_s=60) == [
        Launch("m", "0 of 1 wanted instances")
    ]


def test_drain_without_agent_is_stopped_at_once() -> None:
    instances = [inst("a", S.DRAINING, stop_requested=True, agent_connected=False)]
    assert Stop("a", "draining without an agent") in decide(
        {"m": spec()}, instances, demanded=[], drain_timeout_s=60
    )


def test_drain_past_timeout_is_forced() -> None:
    instances = [
        inst("a", S.DRAINING, stop_requested=True, agent_connected=True, draining_for_s=61)
    ]
    assert decide({"m": spec()}, instances, demanded=[], drain_timeout_s=60) == [
        Stop("a", "drain took longer than 60s")
    ]


def test_drain_within_timeout_waits() -> None:
    instances = [inst("a", S.DRAINING, stop_requested=True, agent_connected=True, draining_for_s=5)]
    assert decide({"m": spec()}, instances, demanded=[], drain_timeout_s=60) == []


def test_model_removed_from_catalog_is_drained() -> None:
    instances = [inst("a", S.READY, model="gone")]
    assert decide({"m": spec()}, instances, demanded=[], drain_timeout_s=60) == [
        Drain("a", "model 'gone' left the catalog")
    ]


def test_models_are_independent() -> None:
    decisions = decide(
        {"a": spec("a"), "b": spec("b", min_replicas=1)},
        [inst("x", S.READY, model="a")],
        demanded=["a"],
        drain_timeout_s=60,
    )
    assert decisions == [Launch("b", "0 of 1 wanted instances")]


def test_held_back_model_is_not_launched_but_still_cleaned_up() -> None:
    instances = [inst("a", S.FAILED, process_alive=True)]
    decisions = decide(
        {"m": spec()}, instances, demanded=["m"], drain_timeout_s=60, held_back=["m"]
    )
    assert decisions == [Stop("a", "failed instance still has a process")]


def test_launch_backoff_grows_and_caps() -> None:
    from controller.reconciler import launch_backoff_s

    assert [launch_backoff_s(n) for n in range(9)] == [0, 1, 2, 4, 8, 16, 32, 60, 60]


# --- rotation before a time limit (SLURM jobs) ------------------------------------------------


def rot(
    models: dict[str, ModelSpec],
    instances: list[InstanceView],
    demanded: list[str] | None = None,
    lead_s: float = 60,
    held_back: tuple[str, ...] = (),
) -> list[object]:
    return list(
        decide(
            models, instances, demanded=["m"] if demanded is None else demanded,
            drain_timeout_s=60, held_back=held_back, rotation_lead_s=lead_s, rotation_settle_s=2,
        )
    )  # fmt: skip


def test_rotation_launches_a_replacement_before_the_time_limit() -> None:
    old = inst("old", S.READY, ends_in_s=50)
    assert rot({"m": spec()}, [old]) == [
        Launch("m", "0 of 1 wanted instances (1 more near their time limit)")
    ]


def test_no_rotation_while_the_time_limit_is_far() -> None:
    assert rot({"m": spec()}, [inst("old", S.READY, ends_in_s=61)]) == []


def test_no_rotation_without_a_time_limit_or_with_rotation_off() -> None:
    assert rot({"m": spec()}, [inst("old", S.READY, ends_in_s=None)]) == []
    assert rot({"m": spec()}, [inst("old", S.READY, ends_in_s=5)], lead_s=0) == []


def test_only_ready_instances_rotate() -> None:
    # One still starting is the model's best hope, whatever its clock says.
    assert rot({"m": spec()}, [inst("new", S.STARTING, ends_in_s=10)]) == []


def test_rotation_waits_while_the_replacement_starts() -> None:
    old = inst("old", S.READY, seq=1, ends_in_s=40)
    new = inst("new", S.STARTING, seq=2, ends_in_s=120)
    assert rot({"m": spec()}, [old, new]) == []  # neither drained nor launched again


def test_rotation_waits_until_the_replacement_has_settled() -> None:
    old = inst("old", S.READY, seq=1, ends_in_s=40)
    new = inst("new", S.READY, seq=2, ends_in_s=120, ready_for_s=1)
    assert rot({"m": spec()}, [old, new]) == []


def test_rotation_drains_the_old_instance_once_the_replacement_is_ready() -> None:
    old = inst("old", S.READY, seq=1, ends_in_s=40)
    new = inst("new", S.READY, seq=2, ends_in_s=120, ready_for_s=3)
    assert rot({"m": spec()}, [old, new]) == [
        Drain("old", "time limit in 40s; its replacement is ready")
    ]


def test_rotation_never_drains_the_replacement_as_excess() -> None:
    # Two live instances for a wish of one: the expiring one goes, not the newest.
    old = inst("old", S.READY, seq=1, ends_in_s=40)
    new = inst("new", S.READY, seq=2, ends_in_s=120, ready_for_s=30)
    assert rot({"m": spec()}, [old, new]) == [
        Drain("old", "time limit in 40s; its replacement is ready")
    ]


def test_rotation_of_several_drains_only_what_ready_replacements_cover() -> None:
    models = {"m": spec(min_replicas=2, max_replicas=2)}
    a = inst("a", S.READY, seq=1, ends_in_s=10)
    b = inst("b", S.READY, seq=2, ends_in_s=30)
    c = inst("c", S.READY, seq=3, ends_in_s=120, ready_for_s=5)
    d = inst("d", S.STARTING, seq=4, ends_in_s=120)
    # One replacement is ready: the instance closest to its limit goes first.
    assert rot(models, [a, b, c, d], demanded=[]) == [
        Drain("a", "time limit in 10s; its replacement is ready")
    ]


def test_rotation_launches_one_replacement_per_expiring_instance() -> None:
    models = {"m": spec(min_replicas=2, max_replicas=2)}
    a = inst("a", S.READY, seq=1, ends_in_s=10)
    b = inst("b", S.READY, seq=2, ends_in_s=30)
    assert (
        rot(models, [a, b], demanded=[])
        == [Launch("m", "0 of 2 wanted instances (2 more near their time limit)")] * 2
    )


def test_expiring_instance_nobody_wants_is_drained() -> None:
    models = {"m": spec(min_replicas=0)}
    assert rot(models, [inst("old", S.READY, ends_in_s=30)], demanded=[]) == [
        Drain("old", "time limit in 30s; its replacement is ready")
    ]


def test_held_back_model_gets_no_replacement_and_keeps_its_instance() -> None:
    assert rot({"m": spec()}, [inst("old", S.READY, ends_in_s=30)], held_back=("m",)) == []


def test_rotation_lead_is_at_most_half_the_time_limit() -> None:
    two_minutes = ModelSpec(name="m", model_path="/w", slurm={"time_limit": "2"})  # type: ignore[arg-type]
    assert rotation_lead(two_minutes, 600) == 60
    assert rotation_lead(two_minutes, 45) == 45
    assert rotation_lead(spec(), 600) == 600  # no limit known
    # A job just started on a 2-minute limit with a 10-minute lead is not expiring yet.
    fresh = inst("a", S.READY, ends_in_s=119)
    assert rot({"m": two_minutes}, [fresh], lead_s=600) == []
    assert rot({"m": two_minutes}, [inst("a", S.READY, ends_in_s=59)], lead_s=600) != []


# --- scaling by load ------------------------------------------------------------------------


def scaled(
    max_replicas: int = 3, up_s: float = 10, down_s: float = 60, min_replicas: int = 0
) -> ModelSpec:
    return ModelSpec(
        name="m", model_path="/w", min_replicas=min_replicas, max_replicas=max_replicas,
        target_in_flight=4, scale_up_window_s=up_s, scale_down_window_s=down_s,
    )  # fmt: skip


def test_load_recommendation_divides_by_the_target_and_caps_at_max() -> None:
    assert load_recommendation(scaled(), 0) == 0
    assert load_recommendation(scaled(), 1) == 1
    assert load_recommendation(scaled(), 8) == 2
    assert load_recommendation(scaled(), 9) == 3
    assert load_recommendation(scaled(max_replicas=3), 100) == 3
    assert load_recommendation(spec(), 100) == 0  # no target: no scaling by load


def test_scale_up_only_after_the_whole_up_window_called_for_it() -> None:
    s = scaled(up_s=10)
    assert stabilised([(95.0, 3), (100.0, 3)], 100.0, 1, s).replicas == 1  # window not covered
    assert stabilised([(89.0, 1), (95.0, 3), (100.0, 3)], 100.0, 1, s).replicas == 3
    # One dip inside the window: only as far as the smallest call.
    assert stabilised([(90.0, 3), (95.0, 2), (100.0, 3)], 100.0, 1, s).replicas == 2
    assert stabilised([(90.0, 3), (95.0, 1), (100.0, 3)], 100.0, 1, s).replicas == 1
    assert stabilised([], 100.0, 1, s) == Scale(1)


def test_scale_down_only_after_the_whole_down_window_called_for_it() -> None:
    s = scaled(up_s=10, down_s=60)
    assert stabilised([(50.0, 1), (100.0, 0)], 100.0, 3, s).replicas == 3  # not covered
    assert stabilised([(40.0, 1), (70.0, 0), (100.0, 0)], 100.0, 3, s).replicas == 1
    assert stabilised([(40.0, 1), (70.0, 3), (100.0, 0)], 100.0, 3, s).replicas == 3
    down = stabilised([(40.0, 0), (100.0, 0)], 100.0, 2, s)
    assert down.replicas == 0
    assert "at most 0 instances for 60s" in down.reason


def test_load_launches_up_to_what_it_calls_for_with_its_reason() -> None:
    instances = [inst("a", S.READY, load=12)]
    scale = Scale(3, "load called for 3 instances for 10s (target 4 in flight each)")
    decisions = decide({"m": scaled()}, instances, ["m"], 60, by_load={"m": scale})
    assert decisions == [Launch("m", f"1 of 3 wanted instances: {scale.reason}")] * 2


def test_load_never_scales_above_max_replicas() -> None:
    instances = [inst("a", S.READY), inst("b", S.READY, seq=2)]
    decisions = decide({"m": scaled(max_replicas=2)}, instances, ["m"], 60,
                       by_load={"m": Scale(5, "x")})  # fmt: skip
    assert decisions == []


def test_pending_instances_count_as_capacity_for_load() -> None:
    instances = [inst("a", S.READY, load=12), inst("b", S.PENDING, seq=2),
                 inst("c", S.STARTING, seq=3)]  # fmt: skip
    assert decide({"m": scaled()}, instances, ["m"], 60, by_load={"m": Scale(3, "x")}) == []


def test_instances_the_load_keeps_are_not_drained_while_demanded() -> None:
    instances = [inst("a", S.READY), inst("b", S.READY, seq=2), inst("c", S.READY, seq=3)]
    assert decide({"m": scaled()}, instances, ["m"], 60, by_load={"m": Scale(3)}) == []


def test_scale_down_drains_ready_instances_least_loaded_first() -> None:
    instances = [inst("a", S.READY, load=3), inst("b", S.READY, seq=2, load=0),
                 inst("c", S.READY, seq=3, load=1)]  # fmt: skip
    decisions = decide({"m": scaled()}, instances, ["m"], 60, by_load={"m": Scale(1, "low")})
    assert decisions == [Drain("b", "3 instances, 1 wanted: low"),
                         Drain("c", "3 instances, 1 wanted: low")]  # fmt: skip


def test_idle_policy_never_cancels_a_pending_job() -> None:
    instances = [inst("ready", S.READY, seq=1), inst("pending", S.PENDING, seq=2)]
    decisions = decide({"m": scaled()}, instances, demanded=[], drain_timeout_s=60,
                       by_load={"m": Scale(0, "idle")})  # fmt: skip
    assert decisions == [Drain("ready", "2 instances, 0 wanted: idle")]
    only_pending = [inst("pending", S.PENDING)]
    assert decide({"m": scaled()}, only_pending, demanded=[], drain_timeout_s=60) == []


def test_scale_to_zero_drains_the_last_instance_without_demand() -> None:
    decisions = decide({"m": scaled()}, [inst("a", S.READY)], demanded=[], drain_timeout_s=60,
                       by_load={"m": Scale(0)})  # fmt: skip
    assert decisions == [Drain("a", "1 instances, 0 wanted")]
    # Demand (within idle_timeout) keeps one even when load calls for none.
    assert decide({"m": scaled()}, [inst("a", S.READY)], ["m"], 60, by_load={"m": Scale(0)}) == []


def test_scale_down_keeps_min_replicas() -> None:
    instances = [inst("a", S.READY), inst("b", S.READY, seq=2)]
    decisions = decide({"m": scaled(min_replicas=2)}, instances, [], 60, by_load={"m": Scale(0)})
    assert decisions == []
