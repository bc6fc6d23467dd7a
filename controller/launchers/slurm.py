"""The slurm launcher: each instance is a SLURM batch job running `kscope-agent`.

Jobs are submitted with `sbatch` over SSH (or on this machine, on a login node),
followed with one batched `squeue` per poll for all of KScope's jobs (`sacct`
for jobs squeue forgot), and cancelled with `scancel`. The reference of an
instance is its job id; the job's name carries the instance id, so a restarted
controller finds its jobs again (controller/adoption.py).
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import re
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass

from controller.catalog import ModelSpec
from controller.launchers.base import LauncherObservation, LaunchError, LaunchSpec, agent_invocation
from controller.launchers.jobscript import (
    REDACTED,
    JobScript,
    instance_from_job_name,
    job_name,
    render_job_script,
)
from controller.launchers.squeue import (
    SQUEUE_COMMAND,
    AccountingDisabled,
    JobInfo,
    QueueListing,
    gone,
    is_active,
    observe_job,
    parse_sacct,
    parse_squeue,
    sacct_command,
)
from controller.launchers.ssh import (
    CommandRunner,
    LocalRunner,
    RemoteError,
    RemoteUnavailable,
    SshRunner,
    SshTarget,
)
from controller.settings import ControllerSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlurmOptions:
    """The slurm launcher's configuration (from ControllerSettings)."""

    agent_python: str
    """Python with KScope installed, as a path on the compute nodes."""
    job_prefix: str = "kscope"
    default_qos: str = ""
    agent_host: str = "@node"
    log_dir: str = "kscope-logs"
    poll_interval_s: float = 2.0
    command_timeout_s: float = 30.0

    @classmethod
    def from_settings(cls, settings: ControllerSettings) -> SlurmOptions:
        return cls(
            agent_python=settings.slurm_agent_python or settings.agent_python,
            job_prefix=settings.slurm_job_prefix,
            default_qos=settings.worker_slurm_qos,
            agent_host=settings.slurm_agent_host,
            log_dir=settings.slurm_log_dir,
            poll_interval_s=settings.slurm_poll_interval_s,
            command_timeout_s=settings.slurm_command_timeout_s,
        )


def runner_from_settings(settings: ControllerSettings) -> CommandRunner:
    """SSH to SSH_HOST when it is set; otherwise SLURM's commands run here."""
    if not settings.ssh_host:
        return LocalRunner()
    return SshRunner(
        SshTarget(
            host=settings.ssh_host,
            port=settings.ssh_port,
            username=settings.ssh_username or getpass.getuser(),
            key=settings.ssh_key.expanduser() if settings.ssh_key else None,
            known_hosts=settings.ssh_known_hosts.expanduser() if settings.ssh_known_hosts else None,
            check_host_key=not settings.ssh_insecure_no_host_key_check,
            connect_timeout_s=settings.ssh_connect_timeout_s,
        )
    )


def build_job_script(spec: LaunchSpec, options: SlurmOptions, redact: bool = False) -> str:
    """The batch script for one instance; with `redact`, the enrollment token is
    replaced (for `kscope slurm-script`, which shows operators what would be
    submitted). The token is one-time and bound to this instance: once the job's
    agent enrolled, the copy in SLURM's spool is worth nothing."""
    invocation = agent_invocation(spec, options.agent_python)
    env = dict(invocation.env)
    if redact:
        env["KSCOPE_ENROLL_TOKEN"] = REDACTED
        env.pop("KSCOPE_INSECURE_PLAINTEXT", None)
    name = job_name(options.job_prefix, spec.instance_id)
    return render_job_script(
        JobScript(
            name=name,
            instance_id=spec.instance_id,
            model=spec.model.name,
            slurm=spec.model.slurm,
            default_qos=options.default_qos,
            output=f"{options.log_dir.rstrip('/')}/%x-%j.log",
            argv=[*invocation.argv, "--host", options.agent_host],
            env=env,
        )
    )


def dry_run_script(model: ModelSpec, options: SlurmOptions, controller_address: str) -> str:
    """What the controller would submit for one instance of `model`."""
    spec = LaunchSpec(f"{model.name.replace('/', '-')}-dryrun", model, controller_address, "")
    return build_job_script(spec, options, redact=True)


class SlurmLauncher:
    """Starts agents as SLURM batch jobs, through a CommandRunner."""

    name = "slurm"

    def __init__(self, runner: CommandRunner, options: SlurmOptions):
        self._runner = runner
        self.options = options
        self._listing: QueueListing | None = None
        self._listing_lock = asyncio.Lock()
        self._submitted_at: dict[str, float] = {}
        """Job id → when sbatch returned (a listing older than that cannot know it)."""
        self._known: set[str] = set()
        """Jobs this launcher submitted or was asked about (cancelled on close)."""
        self._maybe_submitted: set[str] = set()
        """Instances whose sbatch broke off midway: a job may exist, unrecorded."""
        self._sacct_available = True
        self._blind_since = 0.0
        """When squeue started failing (0: it works)."""

    @property
    def where(self) -> str:
        return self._runner.description

    # --- launch --------------------------------------------------------------------------------

    async def launch(self, spec: LaunchSpec) -> str:
        script = build_job_script(spec, self.options)
        log_dir = shlex.quote(self.options.log_dir)
        command = f"mkdir -p {log_dir} && sbatch --parsable"
        try:
            result = await self._runner.run(
                command, stdin=script, timeout_s=self.options.command_timeout_s
            )
        except RemoteUnavailable as exc:
            if exc.maybe_ran:
                self._maybe_submitted.add(spec.instance_id)
            raise LaunchError(f"sbatch via {self.where}: {exc}") from exc
        except asyncio.CancelledError:
            self._maybe_submitted.add(spec.instance_id)  # the controller is stopping
            raise
        if not result.ok:
            detail = (result.stderr or result.stdout).strip() or f"exit code {result.returncode}"
            raise LaunchError(f"sbatch refused the job: {detail}")
        match = re.match(r"^(\d+)", result.stdout.strip())
        if match is None:
            raise LaunchError(f"sbatch printed no job id: {result.stdout.strip()[:200]!r}")
        job_id = match.group(1)
        self._submitted_at[job_id] = time.time()
        self._known.add(job_id)
        log.info("instance %s submitted as SLURM job %s via %s", spec.instance_id, job_id,
                 self.where)  # fmt: skip
        return job_id

    # --- observe -------------------------------------------------------------------------------

    async def listing(self, max_age_s: float | None = None) -> QueueListing:
        """All of KScope's jobs, from one squeue no older than `max_age_s`
        (default: the poll interval). Raises RemoteError when squeue cannot run."""
        max_age = self.options.poll_interval_s if max_age_s is None else max_age_s
        async with self._listing_lock:
            if self._listing is not None and time.time() - self._listing.taken_at < max_age:
                return self._listing
            result = await self._runner.run(
                SQUEUE_COMMAND, timeout_s=self.options.command_timeout_s, retry=True
            )
            if not result.ok:
                raise RemoteError(f"squeue failed: {(result.stderr or result.stdout).strip()}")
            try:
                self._listing = parse_squeue(result.stdout, self.options.job_prefix, time.time())
            except ValueError as exc:
                raise RemoteError(str(exc)) from exc
        await self._cancel_unrecorded(self._listing)
        return self._listing

    async def observe(self, refs: Sequence[str]) -> dict[str, LauncherObservation]:
        try:
            listing = await self.listing()
        except RemoteError as exc:
            # Saying nothing keeps every instance as it was: a lost connection to
            # the login node is not a lost job. Warn once per outage.
            level = logging.DEBUG if self._blind_since else logging.WARNING
            log.log(level, "cannot observe SLURM jobs via %s: %s", self.where, exc)
            self._blind_since = self._blind_since or time.time()
            return {}
        if self._blind_since:
            log.info("observing SLURM jobs again after %.0fs", time.time() - self._blind_since)
            self._blind_since = 0.0
        self._known.update(refs)
        out: dict[str, LauncherObservation] = {}
        forgotten = []
        for ref in refs:
            job = listing.jobs.get(ref)
            if job is not None:
                out[ref] = observe_job(job, listing.taken_at, self._log_hint(job))
            elif self._submitted_at.get(ref, 0.0) >= listing.taken_at:
                continue  # submitted after this listing was taken
            else:
                forgotten.append(ref)
        if forgotten:
            out.update(await self._from_accounting(forgotten, listing.taken_at))
        return out

    def _log_hint(self, job: JobInfo) -> str:
        return f"{self.options.log_dir.rstrip('/')}/{job.name}-{job.job_id}.log"

    async def _from_accounting(
        self, refs: list[str], taken_at: float
    ) -> dict[str, LauncherObservation]:
        known: dict[str, JobInfo] = {}
        if self._sacct_available:
            try:
                known = await self._sacct(refs)
            except AccountingDisabled:
                log.info("sacct is unavailable via %s (no job accounting); jobs squeue "
                         "forgot are reported as gone", self.where)  # fmt: skip
                self._sacct_available = False
            except RemoteError as exc:
                log.warning("sacct via %s failed: %s", self.where, exc)
                return {}  # try again next poll
        out = {}
        for ref in refs:
            job = known.get(ref)
            out[ref] = observe_job(job, taken_at) if job is not None else gone(ref)
        return out

    async def _sacct(self, refs: list[str]) -> dict[str, JobInfo]:
        numeric = [r for r in refs if r.isdigit()]
        if not numeric:
            return {}
        result = await self._runner.run(
            sacct_command(numeric), timeout_s=self.options.command_timeout_s, retry=True
        )
        if not result.ok:
            text = (result.stderr + result.stdout).strip()
            if "accounting storage is disabled" in text.lower() or "not found" in text.lower():
                raise AccountingDisabled(text)
            raise RemoteError(f"sacct failed: {text}")
        return parse_sacct(result.stdout)

    async def _cancel_unrecorded(self, listing: QueueListing) -> None:
        """Cancel jobs whose sbatch broke off midway: their instances failed to
        launch and were replaced, so such a job would only take up a node."""
        if not self._maybe_submitted:
            return
        doubtful, self._maybe_submitted = self._maybe_submitted, set()
        prefix = self.options.job_prefix
        stray = [
            job.job_id
            for job in listing.jobs.values()
            if instance_from_job_name(prefix, job.name) in doubtful and is_active(job.state)
        ]
        if not stray:
            return
        log.warning("cancelling SLURM jobs %s: their submission was never recorded",
                    ", ".join(stray))  # fmt: skip
        try:
            await self._scancel(stray)
        except LaunchError as exc:
            log.warning("%s; trying again next poll", exc)
            self._maybe_submitted |= doubtful

    async def jobs_by_instance(self) -> dict[str, JobInfo]:
        """KScope's jobs that wait or run now, by the instance id their name carries
        (a fresh squeue). Raises RemoteError when squeue cannot run."""
        listing = await self.listing(max_age_s=0.0)
        out = {}
        for job in listing.jobs.values():
            instance = instance_from_job_name(self.options.job_prefix, job.name)
            if instance is not None and is_active(job.state):
                out[instance] = job
        return out

    # --- stop ----------------------------------------------------------------------------------

    async def stop(self, ref: str) -> None:
        """scancel the job: SLURM sends SIGTERM to the job's processes (the agent
        drains), then SIGKILL after its KillWait. A job still PENDING just goes.
        A job already ending (cancelled from outside, say) is left to end, so
        that its final state still says why it ended."""
        try:
            job = (await self.listing(max_age_s=0.0)).jobs.get(ref)
        except RemoteError as exc:
            raise LaunchError(f"cannot stop SLURM job {ref} via {self.where}: {exc}") from exc
        if job is None or not is_active(job.state) or job.state == "COMPLETING":
            log.info("SLURM job %s is %s already; not cancelling it", ref,
                     job.state if job else "gone")  # fmt: skip
            return
        await self._scancel([ref])

    async def _scancel(self, refs: Sequence[str]) -> None:
        ids = [r for r in refs if r.isdigit()]
        if not ids:
            return
        try:
            result = await self._runner.run(
                "scancel " + " ".join(ids), timeout_s=self.options.command_timeout_s, retry=True
            )
        except RemoteUnavailable as exc:
            raise LaunchError(f"scancel via {self.where}: {exc}") from exc
        # scancel of a job that already ended says so and is not a failure.
        if not result.ok and "already completing or completed" not in result.stderr:
            text = (result.stderr or result.stdout).strip()
            if "invalid job id" not in text.lower():
                raise LaunchError(f"scancel {' '.join(ids)} failed: {text}")
        log.info("cancelled SLURM jobs %s", ", ".join(ids))

    async def close(self, stop_instances: bool) -> None:
        try:
            if stop_instances and (self._known or self._maybe_submitted):
                try:
                    jobs = (await self.listing(max_age_s=0.0)).jobs  # cancels unrecorded jobs
                    await self._scancel(
                        [j for j in self._known if j in jobs and is_active(jobs[j].state)]
                    )
                except (RemoteError, LaunchError) as exc:
                    log.error("could not cancel SLURM jobs %s at shutdown: %s",
                              ", ".join(sorted(self._known)), exc)  # fmt: skip
        finally:
            await self._runner.close()


def build_slurm_launcher(settings: ControllerSettings) -> SlurmLauncher:
    """The slurm launcher the settings describe. It connects on first use."""
    return SlurmLauncher(runner_from_settings(settings), SlurmOptions.from_settings(settings))
