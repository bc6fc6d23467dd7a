"""The job script rendered from the catalog: options, setup, secrets kept off argv."""

from __future__ import annotations

import subprocess

import pytest

from controller.catalog import ModelSpec, parse_catalog
from controller.launchers.base import LaunchSpec
from controller.launchers.jobscript import REDACTED, instance_from_job_name, job_name
from controller.launchers.slurm import SlurmOptions, build_job_script, dry_run_script

OPTIONS = SlurmOptions(agent_python="/opt/kscope/bin/python", default_qos="normal",
                       log_dir="/scratch/kscope-logs")  # fmt: skip


def model(**slurm: object) -> ModelSpec:
    return parse_catalog(
        {
            "models": [
                {
                    "name": "qwen-7b",
                    "engine": "vllm",
                    "model_path": "/models/qwen 7b",
                    "launcher": "slurm",
                    "engine_args": ["--max-model-len", "8192"],
                    "env": {"HF_HOME": "/scratch/hf cache"},
                    "slurm": slurm,
                }
            ]
        }
    ).models[0]


CA = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def script(spec: ModelSpec, token: str = "kse1.instance.qwen-7b-1a2b3c4d.s3cret") -> str:
    return build_job_script(LaunchSpec("qwen-7b-1a2b3c4d", spec, "ctl:50051", token, CA), OPTIONS)


def sbatch_lines(text: str) -> list[str]:
    return [
        line.removeprefix("#SBATCH ") for line in text.splitlines() if line.startswith("#SBATCH")
    ]


def test_every_catalog_field_becomes_its_sbatch_option() -> None:
    text = script(
        model(
            partition="gpu", qos="high", account="lab42", gres="gpu:a100:2", cpus=16,
            memory="128G", time_limit="1-00:00:00",
            extra_sbatch=["--constraint=a100", "--exclusive"],
        )
    )  # fmt: skip
    assert text.startswith("#!/bin/bash\n")
    assert sbatch_lines(text) == [
        "--job-name=kscope-qwen-7b-1a2b3c4d",
        "--comment=kscope:instance=qwen-7b-1a2b3c4d",
        "--nodes=1",
        "--ntasks=1",
        "--output=/scratch/kscope-logs/%x-%j.log",
        "--partition=gpu",
        "--qos=high",
        "--account=lab42",
        "--gres=gpu:a100:2",
        "--cpus-per-task=16",
        "--mem=128G",
        "--time=1-00:00:00",
        "--constraint=a100",
        "--exclusive",
    ]


def test_empty_fields_leave_cluster_defaults_and_qos_defaults_to_worker_slurm_qos() -> None:
    lines = sbatch_lines(script(model()))
    assert "--qos=normal" in lines  # WORKER_SLURM_QOS
    for flag in ("--partition", "--account", "--gres", "--cpus-per-task", "--mem", "--time"):
        assert not any(line.startswith(flag) for line in lines), flag


def test_setup_lines_run_before_the_agent_in_order() -> None:
    text = script(model(setup=["module load cuda/12.4", "source /opt/venv/bin/activate"]))
    lines = text.splitlines()
    cuda = lines.index("module load cuda/12.4")
    venv = lines.index("source /opt/venv/bin/activate")
    agent = next(i for i, line in enumerate(lines) if line.startswith("exec "))
    assert cuda < venv < agent


def test_agent_command_and_its_secrets() -> None:
    text = script(model())
    exec_line = next(line for line in text.splitlines() if line.startswith("exec "))
    assert exec_line == (
        "exec /opt/kscope/bin/python -m node_agent.main --engine vllm --model qwen-7b "
        "--model-path '/models/qwen 7b' --engine-args-json '[\"--max-model-len\", \"8192\"]' "
        "--host @node"
    )
    # Controller, instance and token reach the agent only through its environment.
    assert "s3cret" not in exec_line
    assert "export KSCOPE_ENROLL_TOKEN=kse1.instance.qwen-7b-1a2b3c4d.s3cret" in text
    assert "KSCOPE_REGISTRATION_TOKEN" not in text  # no cluster-wide secret any more
    assert "export KSCOPE_CONTROLLER=ctl:50051" in text
    assert "export KSCOPE_INSTANCE_ID=qwen-7b-1a2b3c4d" in text
    assert "export HF_HOME='/scratch/hf cache'" in text


def test_script_is_valid_bash_and_exports_what_the_agent_reads() -> None:
    text = script(model(setup=["echo setup-ran >&2"]), token="tok with 'quotes' $and spaces")
    probe = text.replace(
        text[text.index("exec ") :],
        'echo "$KSCOPE_ENROLL_TOKEN|$HF_HOME|${KSCOPE_STRAY:-unset}"\n'
        'printf %s "$KSCOPE_TLS_CA" >&2\n',
    )
    env = {"PATH": "/usr/bin:/bin", "KSCOPE_STRAY": "from the submitter"}
    done = subprocess.run(
        ["bash", "-c", probe], capture_output=True, text=True, timeout=10, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "tok with 'quotes' $and spaces|/scratch/hf cache|unset"
    assert "setup-ran" in done.stderr
    assert CA.strip() in done.stderr  # the CA certificate, multi-line, intact


def test_a_failing_setup_line_fails_the_job() -> None:
    text = script(model(setup=["false", "echo after"]))
    done = subprocess.run(["bash", "-c", text.replace("exec ", "echo ")], capture_output=True,
                          text=True, timeout=10)  # fmt: skip
    assert done.returncode != 0
    assert "after" not in done.stdout


def test_dry_run_redacts_the_token() -> None:
    text = dry_run_script(model(), OPTIONS, "ctl:50051")
    assert f"export KSCOPE_ENROLL_TOKEN='{REDACTED}'" in text
    assert "--job-name=kscope-qwen-7b-dryrun" in text


@pytest.mark.parametrize(
    "slurm",
    [
        {"partition": "gpu\n#SBATCH --uid=0"},
        {"gres": "gpu:1 --exclusive"},
        {"account": "a'b"},
        {"memory": "lots"},
        {"time_limit": "2 hours"},
        {"extra_sbatch": ["#SBATCH --x"]},
        {"extra_sbatch": ["--a\n--b"]},
        {"setup": ["module load x\nrm -rf /"]},
        {"cpus": 0},
        {"nodes": 2},
    ],
)
def test_catalog_rejects_what_would_break_or_inject_into_the_script(slurm: object) -> None:
    with pytest.raises(ValueError, match="slurm"):
        model(**slurm)  # type: ignore[arg-type]


def test_env_names_must_be_shell_variables() -> None:
    spec = model().model_copy(update={"env": {"BAD-NAME": "x"}})
    with pytest.raises(ValueError, match="BAD-NAME"):
        script(spec)


def test_job_names_carry_the_instance_id() -> None:
    name = job_name("kscope", "qwen-7b-1a2b3c4d")
    assert instance_from_job_name("kscope", name) == "qwen-7b-1a2b3c4d"
    assert instance_from_job_name("kscope", "someone-elses-job") is None
    assert instance_from_job_name("kscope", "kscope-") is None
    assert instance_from_job_name("other", name) is None
