"""Reading SLURM's queue, and what each job state means for its instance."""

from __future__ import annotations

import pytest

from controller.catalog import ModelSpec, parse_duration
from controller.launchers.squeue import (
    JobInfo,
    gone,
    is_active,
    observe_job,
    parse_sacct,
    parse_squeue,
)
from controller.lifecycle import InstanceState, LauncherPhase
from controller.records import InstanceRecord
from controller.routes import PENDING_RETRY_S, pending_retry_after_s, summarize

# Lines as squeue printed them on the test cluster (the first: `date +%s` there).
LISTING = """\
1795324200
1|COMPLETED|None|2026-11-22T05:09:38|0:57|vm|kscope-echo-aaaa0001
2|RUNNING|None|2026-11-22T05:09:46|1:59:30|vm|kscope-echo-aaaa0002
3|PENDING|Priority|2026-11-22T05:14:46|1:00|(Priority)|kscope-echo-aaaa0003
4|PENDING|QOSMaxJobsPerUserLimit|N/A|10:00||kscope-tiny-aaaa0004
5|COMPLETING|None|2026-11-22T05:09:46|0:59|vm|kscope-echo-aaaa0005
6|RUNNING|None|2026-11-22T05:09:46|UNLIMITED|vm|kscope-odd|name-aaaa0006
7|RUNNING|None|2026-11-22T05:09:46|0:59|vm|somebody-elses-job
"""
NOW = 1795324200.0  # 2026-11-22T05:10:00 UTC, the cluster's clock at listing time


def listing() -> dict[str, JobInfo]:
    return parse_squeue(LISTING, "kscope", taken_at=1000.0).jobs


def test_listing_keeps_only_kscope_jobs() -> None:
    assert sorted(listing()) == ["1", "2", "3", "4", "5", "6"]
    assert listing()["6"].name == "kscope-odd|name-aaaa0006"  # "|" in a name is harmless


def test_listing_fields() -> None:
    jobs = listing()
    assert jobs["2"] == JobInfo(
        job_id="2", state="RUNNING", reason="", start_in_s=-14.0, time_left_s=7170.0,
        start="2026-11-22 05:09:46", nodes="vm", name="kscope-echo-aaaa0002",
    )  # fmt: skip
    assert jobs["3"].reason == "Priority"
    assert jobs["3"].start_in_s == 4 * 60 + 46
    assert jobs["4"].start_in_s is None and jobs["4"].start == ""
    assert jobs["6"].time_left_s is None


def test_garbage_is_an_error_not_an_empty_queue() -> None:
    with pytest.raises(ValueError):
        parse_squeue("squeue: error: Invalid user\n", "kscope", 0.0)
    with pytest.raises(ValueError):
        parse_squeue("", "kscope", 0.0)


def test_running_job_reports_its_node_and_time_limit() -> None:
    obs = observe_job(listing()["2"], observed_at=1000.0)
    assert obs.phase is LauncherPhase.RUNNING
    assert obs.reason == "SLURM job 2 is RUNNING on vm"
    assert obs.ends_at == 1000.0 + 7170.0  # on the controller's clock, whatever the cluster's


def test_completing_job_still_runs() -> None:
    # Its processes are being signalled; it ends when they are gone.
    assert observe_job(listing()["5"], 0.0).phase is LauncherPhase.RUNNING


def test_pending_job_reports_reason_and_expected_start() -> None:
    obs = observe_job(listing()["3"], observed_at=1000.0)
    assert obs.phase is LauncherPhase.PENDING
    assert obs.reason == (
        "SLURM job 3 is PENDING (Priority), expected to start at 2026-11-22 05:14:46 UTC"
    )
    assert obs.expected_start == 1000.0 + 286.0
    no_estimate = observe_job(listing()["4"], observed_at=1000.0)
    assert no_estimate.reason == "SLURM job 4 is PENDING (QOSMaxJobsPerUserLimit)"
    assert no_estimate.expected_start is None


@pytest.mark.parametrize(
    ("state", "words"),
    [
        ("CANCELLED", "was cancelled"),
        ("FAILED", "failed"),
        ("TIMEOUT", "reached its time limit"),
        ("NODE_FAIL", "ended because its node failed"),
        ("PREEMPTED", "was preempted"),
        ("OUT_OF_MEMORY", "ran out of memory"),
        ("BOOT_FAIL", "ended because its node did not boot"),
        ("DEADLINE", "missed its deadline"),
    ],
)
def test_jobs_that_end_without_the_controller_say_why(state: str, words: str) -> None:
    job = JobInfo(job_id="9", state=state, name="kscope-m-1")
    obs = observe_job(job, 0.0, log_hint="logs/kscope-m-1-9.log")
    assert obs.phase is LauncherPhase.ENDED
    assert obs.reason == f"SLURM job 9 {words} ({state}); its output: logs/kscope-m-1-9.log"
    assert not is_active(state)


def test_completed_job() -> None:
    obs = observe_job(listing()["1"], 0.0, log_hint="x.log")
    assert obs.phase is LauncherPhase.ENDED
    assert obs.reason == "SLURM job 1 completed (COMPLETED)"


@pytest.mark.parametrize("state", ["REQUEUED", "REQUEUE_HOLD", "CONFIGURING"])
def test_requeued_and_configuring_jobs_wait(state: str) -> None:
    assert observe_job(JobInfo("9", state), 0.0).phase is LauncherPhase.PENDING
    assert is_active(state)


def test_unknown_states_count_as_running() -> None:
    # Watched, and cancelled by the controller if its instance is done with it.
    assert observe_job(JobInfo("9", "SOMETHING_NEW"), 0.0).phase is LauncherPhase.RUNNING


def test_sacct_lines() -> None:
    jobs = parse_sacct("41|CANCELLED by 0|0:15|None\n42|FAILED|1:0|NonZeroExitCode\n\n")
    assert jobs["41"].state == "CANCELLED"
    assert observe_job(jobs["42"], 0.0).reason == (
        "SLURM job 42 failed (FAILED, NonZeroExitCode, exit code 1:0)"
    )


def test_a_job_nobody_remembers_is_gone() -> None:
    obs = gone("77")
    assert obs.phase is LauncherPhase.ENDED
    assert "SLURM job 77 left the queue" in obs.reason


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30", 1800.0),
        ("0:59", 59.0),
        ("1:59:30", 7170.0),
        ("2-03:04:05", 2 * 86400 + 3 * 3600 + 4 * 60 + 5.0),
        ("1-00", 86400.0),
        ("UNLIMITED", None),
        ("NOT_SET", None),
        ("INVALID", None),
    ],
)
def test_durations(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


# --- what users see: Retry-After and the 503 message ------------------------------------------


def test_retry_after_follows_the_expected_start() -> None:
    spec = ModelSpec(name="m", model_path="/w", expected_startup_s=40)
    assert pending_retry_after_s(1000.0 + 300, 1000.0, spec) == 340  # start, then load
    assert pending_retry_after_s(1000.0 - 5, 1000.0, spec) == 40  # overdue: just the load
    assert pending_retry_after_s(None, 1000.0, spec) == PENDING_RETRY_S


def test_pending_model_summary_names_the_job_state_and_retry() -> None:
    spec = ModelSpec(name="m", model_path="/w", expected_startup_s=40)
    pending = InstanceRecord(
        id="m-1", model="m", launcher="slurm", seq=1, created_at=900.0,
        state=InstanceState.PENDING, reason="SLURM job 3 is PENDING (Resources)",
        launcher_phase=LauncherPhase.PENDING, launcher_reason="SLURM job 3 is PENDING (Resources)",
        launcher_expected_start=1600.0,
    )  # fmt: skip
    summary = summarize(spec, [pending], now=1000.0)
    assert summary.message == "pending: SLURM job 3 is PENDING (Resources)"
    assert summary.retry_after_s == 640


def test_starting_model_summary_names_the_running_job() -> None:
    spec = ModelSpec(name="m", model_path="/w", expected_startup_s=40)
    starting = InstanceRecord(
        id="m-1", model="m", launcher="slurm", seq=1, created_at=990.0,
        state=InstanceState.STARTING, reason="waiting for the agent to register",
        launcher_phase=LauncherPhase.RUNNING, launcher_reason="SLURM job 3 is RUNNING on vm",
    )  # fmt: skip
    summary = summarize(spec, [starting], now=1000.0)
    assert summary.message == (
        "starting: waiting for the agent to register; SLURM job 3 is RUNNING on vm"
    )
    assert summary.retry_after_s == 30
