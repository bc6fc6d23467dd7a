"""After a controller (re)start: match SLURM's queue with the stored instances.

Instances whose job id was stored are simply observed again by the control
loop: same job, same instance. This pass covers the gap the store cannot: a
controller that died after `sbatch` returned but before it saved the job id.
Such a job is found by its name (which carries the instance id) and adopted;
an instance with neither a stored id nor a job never reached SLURM and fails,
so the reconciler replaces it; a job whose instance has already ended is
cancelled. Nothing is submitted twice and no job is left without an owner.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection

from controller.fleet import Fleet
from controller.launchers.base import LaunchError
from controller.launchers.slurm import SlurmLauncher
from controller.launchers.ssh import RemoteError
from kscope_common.retry import SLURM, Backoff, RetryPolicy

log = logging.getLogger(__name__)


async def adopt_jobs(fleet: Fleet, launcher: SlurmLauncher, stored: Collection[str]) -> None:
    """One matching pass over the instances loaded from the store (`stored`: ones
    launched since are this controller's own business). Raises RemoteError when
    the queue cannot be read."""
    jobs = await launcher.jobs_by_instance()
    changed = False
    for inst in list(fleet.instances.values()):
        if inst.launcher != launcher.name or inst.id not in stored:
            jobs.pop(inst.id, None)
            continue
        job = jobs.pop(inst.id, None)
        if inst.state.ended:
            if job is not None and job.job_id != inst.launcher_ref:
                log.warning("cancelling SLURM job %s: its instance %s is %s", job.job_id,
                            inst.id, inst.state.value)  # fmt: skip
                await launcher.stop(job.job_id)
            continue
        if inst.launcher_ref or inst.launch_error:
            continue
        if job is not None:
            log.info("adopting SLURM job %s for instance %s (its id was never stored)",
                     job.job_id, inst.id)  # fmt: skip
            await fleet.record_launch(inst.id, job.job_id)
        else:
            error = "the controller stopped before it submitted the job"
            await fleet.record_launch_error(inst.id, error)
        changed = True
    for instance_id, job in jobs.items():
        log.warning(
            "SLURM job %s (%s) belongs to no instance this controller knows "
            "(another controller's?); leaving it alone", job.job_id, instance_id,
        )  # fmt: skip
    if changed:
        fleet.wake.set()


async def adopt_jobs_when_reachable(
    fleet: Fleet, launcher: SlurmLauncher, stored: Collection[str], policy: RetryPolicy = SLURM
) -> None:
    """Run adopt_jobs once, retrying with backoff while SLURM cannot be reached."""
    if not any(fleet.instances[i].launcher == launcher.name for i in stored):
        return  # nothing of SLURM's in the store: nothing to match
    backoff = Backoff(policy)
    while True:
        delay = backoff.next_delay()
        try:
            await adopt_jobs(fleet, launcher, stored)
            return
        except (RemoteError, LaunchError) as exc:
            log.warning("matching SLURM jobs with instances failed (%s); retrying in %.0fs",
                        exc, delay)  # fmt: skip
        await asyncio.sleep(delay)
