"""Every decision the reconciler can make, from snapshots."""

from __future__ import annotations

from controller.catalog import ModelSpec
from controller.lifecycle import InstanceState
from controller.reconciler import Drain, InstanceView, Launch, Stop, decide, wanted_replicas

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
