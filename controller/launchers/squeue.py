"""Reading SLURM's queue: the squeue command KScope runs, its output, and what a
job's state means for the instance it carries.

One batched `squeue -t all` per poll lists every KScope job of the user,
finished ones included (until SLURM's MinJobAge forgets them); `sacct` tells the
end of jobs squeue forgot, where accounting runs. Times are printed in UTC and
measured against the cluster's own clock (`date +%s` in the same command), so a
skewed clock between controller and cluster does not matter.
"""

from __future__ import annotations

import calendar
import time
from dataclasses import dataclass

from controller.catalog import parse_duration
from controller.launchers.base import LauncherObservation
from controller.lifecycle import LauncherPhase

_SEP = "|"
# job id | state | reason | start time | time left | nodes | name (last: names may hold "|").
SQUEUE_FORMAT = _SEP.join(["%i", "%T", "%r", "%S", "%L", "%N", "%j"])
SQUEUE_COMMAND = (
    f"date +%s; env TZ=UTC squeue --noheader --states=all --me --format='{SQUEUE_FORMAT}'"
)


def sacct_command(job_ids: list[str]) -> str:
    """Final states of jobs squeue no longer lists."""
    return (
        "sacct --noheader --parsable2 --allocations --format=JobIDRaw,State,ExitCode,Reason "
        f"--jobs={','.join(job_ids)}"
    )


@dataclass(frozen=True)
class JobInfo:
    """One line of squeue (or sacct), parsed."""

    job_id: str
    state: str
    """SLURM's long state name: PENDING, RUNNING, COMPLETING, CANCELLED…"""
    reason: str = ""
    """Why it pends (Priority, Resources, QOSMaxJobsPerUserLimit…), or "" for None."""
    start_in_s: float | None = None
    """Seconds from the listing until its (expected) start; None when SLURM has no estimate."""
    time_left_s: float | None = None
    """Seconds of its time limit left; None when unlimited or unknown."""
    start: str = ""
    """The start time as squeue printed it (UTC), when it printed one."""
    nodes: str = ""
    name: str = ""
    exit_code: str = ""


@dataclass(frozen=True)
class QueueListing:
    jobs: dict[str, JobInfo]
    """By job id."""
    taken_at: float
    """The controller's clock when the listing arrived."""


_STARTED = {"RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESIZING"}
_WAITING = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"}
_ENDED = {
    "COMPLETED": "completed",
    "CANCELLED": "was cancelled",
    "FAILED": "failed",
    "TIMEOUT": "reached its time limit",
    "NODE_FAIL": "ended because its node failed",
    "PREEMPTED": "was preempted",
    "BOOT_FAIL": "ended because its node did not boot",
    "DEADLINE": "missed its deadline",
    "OUT_OF_MEMORY": "ran out of memory",
    "REVOKED": "was revoked",
    "SPECIAL_EXIT": "ended (SPECIAL_EXIT)",
}


def is_active(state: str) -> bool:
    """The job waits or runs (it has not ended)."""
    return state not in _ENDED


def _parse_utc(text: str) -> float | None:
    try:
        return float(calendar.timegm(time.strptime(text.strip(), "%Y-%m-%dT%H:%M:%S")))
    except ValueError:
        return None  # N/A, Unknown, None


def parse_squeue(output: str, prefix: str, taken_at: float) -> QueueListing:
    """Parse SQUEUE_COMMAND's output, keeping only jobs named PREFIX-…"""
    lines = output.splitlines()
    if not lines or not lines[0].strip().isdigit():
        raise ValueError(f"unexpected squeue output: {output[:200]!r}")
    cluster_now = float(lines[0].strip())
    jobs: dict[str, JobInfo] = {}
    for line in lines[1:]:
        fields = line.split(_SEP, 6)
        if len(fields) != 7:
            continue
        job_id, state, reason, start, left, nodes, name = (f.strip() for f in fields)
        if not name.startswith(f"{prefix}-"):
            continue
        start_at = _parse_utc(start)
        jobs[job_id] = JobInfo(
            job_id=job_id,
            state=state.split()[0] if state else "UNKNOWN",
            reason="" if reason in ("None", "(null)") else reason,
            start_in_s=start_at - cluster_now if start_at is not None else None,
            time_left_s=parse_duration(left),
            start=start.replace("T", " ") if start_at is not None else "",
            nodes=nodes,
            name=name,
        )
    return QueueListing(jobs, taken_at)


class AccountingDisabled(Exception):
    """sacct cannot answer: this cluster keeps no job accounting."""


def parse_sacct(output: str) -> dict[str, JobInfo]:
    """Parse sacct_command's output (JobIDRaw|State|ExitCode|Reason)."""
    jobs = {}
    for line in output.splitlines():
        fields = line.split("|")
        if len(fields) < 3 or not fields[0].strip():
            continue
        job_id, state, exit_code = (f.strip() for f in fields[:3])
        reason = fields[3].strip() if len(fields) > 3 else ""
        jobs[job_id] = JobInfo(
            job_id=job_id,
            state=state.split()[0] if state else "UNKNOWN",  # "CANCELLED by 1000"
            reason="" if reason in ("None", "(null)") else reason,
            exit_code=exit_code,
        )
    return jobs


def observe_job(job: JobInfo, observed_at: float, log_hint: str = "") -> LauncherObservation:
    """What a job's state means for its instance. Times become this clock's
    epoch seconds; `log_hint` (where the job's output is) joins failure reasons."""
    what = f"SLURM job {job.job_id}"
    if job.state in _ENDED:
        detail = job.state
        if job.reason:
            detail += f", {job.reason}"
        if job.exit_code and job.exit_code not in ("0:0", ""):
            detail += f", exit code {job.exit_code}"
        reason = f"{what} {_ENDED[job.state]} ({detail})"
        if job.state != "COMPLETED" and log_hint:
            reason += f"; its output: {log_hint}"
        return LauncherObservation(LauncherPhase.ENDED, reason)
    if job.state in _WAITING:
        reason = f"{what} is {job.state}"
        if job.reason:
            reason += f" ({job.reason})"
        expected = None
        if job.start_in_s is not None and job.state == "PENDING":
            expected = observed_at + job.start_in_s
            # The cluster's own words: a reason that changes every poll would be
            # stored and pushed to every facade every poll.
            reason += f", expected to start at {job.start} UTC"
        return LauncherObservation(LauncherPhase.PENDING, reason, expected_start=expected)
    # RUNNING and its kin (COMPLETING, SUSPENDED…); unknown states count as running
    # so that the controller keeps watching, and cancels the job when it must.
    reason = f"{what} is {job.state}" + (f" on {job.nodes}" if job.nodes else "")
    ends_at = observed_at + job.time_left_s if job.time_left_s is not None else None
    return LauncherObservation(LauncherPhase.RUNNING, reason, ends_at=ends_at)


def gone(job_id: str) -> LauncherObservation:
    """A job neither squeue nor sacct knows."""
    return LauncherObservation(
        LauncherPhase.ENDED,
        f"SLURM job {job_id} left the queue (its final state is unknown: squeue forgot it "
        "and sacct has no record)",
    )
