"""The batch script each SLURM job runs, rendered from the catalog.

The script is handed to `sbatch` on its standard input, never written to a file
by KScope: the one-time enrollment token it exports reaches only SLURM's own
spool (readable by the job's user and SLURM's administrators), never a command
line that `ps` shows or a world-readable file; and it is dead once the job's
agent enrolled.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from controller.catalog import SlurmSpec

REDACTED = "<redacted: a one-time enrollment token is filled in at submission>"

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def job_name(prefix: str, instance_id: str) -> str:
    """The job's name: a restarted controller finds its instances' jobs by it."""
    return f"{prefix}-{instance_id}"


def instance_from_job_name(prefix: str, name: str) -> str | None:
    """The instance id a job name carries, or None for jobs that are not KScope's."""
    head = f"{prefix}-"
    return name[len(head) :] if name.startswith(head) and len(name) > len(head) else None


@dataclass(frozen=True)
class JobScript:
    """Everything one job script says."""

    name: str
    """--job-name (see job_name)."""
    instance_id: str
    model: str
    slurm: SlurmSpec
    default_qos: str
    """WORKER_SLURM_QOS: used when the catalog names no qos."""
    output: str
    """--output path; SLURM expands %x (job name) and %j (job id)."""
    argv: Sequence[str]
    """The agent's command line: public, so no secrets in it."""
    env: Mapping[str, str]
    """Exported before the agent starts; holds the enrollment token."""


def sbatch_options(job: JobScript) -> list[str]:
    """The #SBATCH options, in a stable order."""
    spec = job.slurm
    options = [
        f"--job-name={job.name}",
        f"--comment=kscope:instance={job.instance_id}",
        "--nodes=1",
        "--ntasks=1",
        f"--output={job.output}",
    ]
    qos = spec.qos or job.default_qos
    for flag, value in [
        ("--partition", spec.partition),
        ("--qos", qos),
        ("--account", spec.account),
        ("--gres", spec.gres),
        ("--cpus-per-task", str(spec.cpus) if spec.cpus else ""),
        ("--mem", spec.memory),
        ("--time", spec.time_limit),
    ]:
        if value:
            options.append(f"{flag}={value}")
    options.extend(spec.extra_sbatch)
    return options


def render_job_script(job: JobScript) -> str:
    """The batch script for one instance."""
    for name in job.env:
        if not _ENV_NAME.match(name):
            raise ValueError(f"model {job.model!r}: env name {name!r} is not a shell variable")
    lines = ["#!/bin/bash"]
    lines += [f"#SBATCH {option}" for option in sbatch_options(job)]
    lines += [
        "",
        f"# KScope instance {job.instance_id} of model {job.model}, rendered from the",
        "# catalog by the controller. The agent registers itself with the controller",
        "# and serves the model until the controller drains it or the job ends.",
        "",
        "# A failed setup line fails the job at once, with its error in the log,",
        "# rather than starting an agent in a half-built environment.",
        "set -eo pipefail",
        "# Settings meant for the submitting shell must not reach the agent.",
        'unset $(compgen -e | grep "^KSCOPE_") 2>/dev/null || true',
    ]
    if job.slurm.setup:
        lines += ["", "# Setup from the catalog."]
        lines += list(job.slurm.setup)
    lines += ["", "# Read by the agent from its environment, never from its command line."]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in job.env.items()]
    lines += ["", "exec " + shlex.join(job.argv), ""]
    return "\n".join(lines)
