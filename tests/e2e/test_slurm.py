"""The slurm launcher against a real one-node SLURM and a real sshd on loopback
(scripts/slurm-up.sh, `make slurm-up`): submit, follow, replace, stop, rotate and
re-adopt jobs, and survive SSH trouble.

Agents mostly use the `openai` engine in front of bench/upstream.py (they start in
about a second); one test runs a real vLLM (CPU build) inside a job. Each test
run names its jobs with a prefix of its own and cancels what is left of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from controller.catalog import EngineKind, ModelSpec
from controller.launchers.base import LaunchSpec
from controller.launchers.slurm import SlurmLauncher, SlurmOptions
from controller.launchers.ssh import LocalRunner, RemoteRefused, SshRunner, SshTarget
from controller.lifecycle import LauncherPhase
from kscope.v1 import control_pb2
from kscope_common.tls import EnrollmentError, enroll
from tests.conftest import require
from tests.procs import (
    Controller,
    Facade,
    Upstream,
    restart_controller,
    run_kscope,
    start_controller,
    start_facade,
    start_upstream,
    wait_until,
)
from tests.slurm_cluster import Cluster, PrivateSshd, cluster_or_fail, processes_of

pytestmark = pytest.mark.slurm

API_KEY = "slurm-test-key"
READY = control_pb2.INSTANCE_STATE_READY
FAILED = control_pb2.INSTANCE_STATE_FAILED
STOPPED = control_pb2.INSTANCE_STATE_STOPPED


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    try:
        return cluster_or_fail()
    except pytest.fail.Exception as missing:
        require("SLURM", False, str(missing))
        raise


@pytest.fixture(scope="module")
def prefix() -> str:
    """Job names of this test run only: kst<pid>-<instance id>."""
    return f"kst{os.getpid()}"


def controller_env(
    cluster: Cluster, tmp: Path, prefix: str, port: int, known_hosts: Path, **extra: str
) -> dict[str, str]:
    return {
        # The original proxy's variable names, which KScope honours.
        "SSH_HOST": "127.0.0.1",
        "SSH_PORT": str(port),
        "SSH_USERNAME": "root",
        "KSCOPE_SSH_KEY": str(cluster.ssh_key),
        "KSCOPE_SSH_KNOWN_HOSTS": str(known_hosts),
        "KSCOPE_SLURM_POLL_INTERVAL_S": "1",
        "KSCOPE_SLURM_AGENT_HOST": "127.0.0.1",
        "KSCOPE_SLURM_LOG_DIR": str(tmp / "job-logs"),
        "KSCOPE_SLURM_JOB_PREFIX": prefix,
        **extra,
    }


@dataclass
class System:
    tmp: Path
    cluster: Cluster
    prefix: str
    controller: Controller
    facade: Facade
    upstreams: list[Upstream] = field(default_factory=list)
    sshd: PrivateSshd | None = None

    def client(self, **kw: Any) -> openai.OpenAI:
        options: dict[str, Any] = {"max_retries": 0, "timeout": 60, **kw}
        return openai.OpenAI(base_url=f"{self.facade.base_url}/v1", api_key=API_KEY, **options)

    def instances(self, model: str, include_ended: bool = False) -> list[control_pb2.Instance]:
        return self.controller.list_instances(model=model, include_ended=include_ended)

    def instance(self, instance_id: str) -> control_pb2.Instance:
        return next(i for i in self.instances("", include_ended=True) if i.id == instance_id)

    def wait_ready(
        self, model: str, timeout_s: float = 30, other_than: str = ""
    ) -> control_pb2.Instance:
        found: list[control_pb2.Instance] = []

        def ready() -> bool:
            found[:] = [i for i in self.instances(model) if i.state == READY and i.id != other_than]
            return bool(found)

        wait_until(ready, timeout_s, 0.2, what=f"{model} READY (other than {other_than!r})")
        return found[0]

    def stop_instance(self, instance_id: str) -> None:
        with self.controller.channel() as channel:
            self.controller.stub(channel).StopInstance(
                control_pb2.StopInstanceRequest(instance_id=instance_id), timeout=10
            )

    def ask(self, model: str) -> None:
        answer = self.client().chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert answer.usage is not None and answer.usage.completion_tokens == 3

    def shut_down(self) -> None:
        self.facade.proc.stop()
        self.controller.proc.stop(grace_s=40)  # cancels its jobs (stop_instances_on_exit)
        self.cluster.cancel_all(self.prefix)
        if self.sshd is not None:
            self.sshd.stop()
        for upstream in self.upstreams:
            upstream.proc.stop()


def job_gone(system: System, job_id: str) -> Callable[[], bool]:
    return lambda: job_id not in system.cluster.active_jobs(system.prefix)


# --- one model on a private sshd: the life of a job ----------------------------------------


@pytest.fixture(scope="module")
def echo(
    cluster: Cluster, prefix: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    tmp = tmp_path_factory.mktemp("slurm-echo")
    sshd = PrivateSshd(cluster, tmp)
    sshd.start()
    upstream = start_upstream(tmp)
    catalog = f"""
[[models]]
name = "echo"
engine = "openai"
upstream_url = "{upstream.url}"
launcher = "slurm"
min_replicas = 1
expected_startup_s = 3

[models.slurm]
time_limit = "10"
"""
    env = controller_env(cluster, tmp, prefix, sshd.port, sshd.known_hosts)
    controller = start_controller(tmp, catalog, env=env)
    facade = start_facade(tmp, controller, api_key=API_KEY)
    system = System(tmp, cluster, prefix, controller, facade, [upstream], sshd)
    try:
        yield system
    finally:
        system.shut_down()


def test_an_instance_is_one_slurm_job_whose_agent_registers(echo: System) -> None:
    inst = echo.wait_ready("echo")
    assert echo.cluster.active_jobs(echo.prefix) == {inst.launcher_ref: f"{echo.prefix}-{inst.id}"}
    echo.ask("echo")
    # The job script holds a one-time token bound to this instance, which reaches
    # the agent through its environment (not argv) and is dead once it enrolled.
    script = echo.cluster.run("scontrol", "write", "batch_script", inst.launcher_ref, "-")
    found = re.search(r"^export KSCOPE_ENROLL_TOKEN=(\S+)$", script, re.MULTILINE)
    assert found is not None, script
    token = found.group(1).strip("'")
    assert token.startswith(f"kse1.instance.{inst.id}.")
    assert "REGISTRATION" not in script
    pids = processes_of(inst.id)
    assert pids, "no process of the instance on the node"
    for pid in pids:
        with contextlib.suppress(OSError):
            assert token.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    with pytest.raises(EnrollmentError, match="already"):
        asyncio.run(enroll(echo.controller.address, echo.controller.ca_pem, token))


def test_scancel_from_outside_fails_the_instance_and_a_replacement_follows(echo: System) -> None:
    old = echo.wait_ready("echo")
    echo.cluster.run("scancel", old.launcher_ref)

    def failed_with_reason() -> bool:
        inst = echo.instance(old.id)
        return inst.state == FAILED and "cancelled" in inst.reason

    wait_until(failed_with_reason, 5, 0.1, what="instance FAILED naming the cancellation")
    assert f"SLURM job {old.launcher_ref} was cancelled" in echo.instance(old.id).reason
    new = echo.wait_ready("echo", other_than=old.id)
    assert new.launcher_ref != old.launcher_ref
    echo.ask("echo")
    wait_until(lambda: not processes_of(old.id), 15, what="the cancelled job's processes gone")


def test_stopping_an_instance_drains_it_and_its_job_leaves(echo: System) -> None:
    inst = echo.wait_ready("echo")
    # As an operator does it: `kscope stop`.
    done = run_kscope(echo.controller, "stop", inst.id, key=echo.controller.admin_key)
    assert done.returncode == 0, done.stderr
    wait_until(job_gone(echo, inst.launcher_ref), 20, 0.2, what="job left the queue")
    wait_until(lambda: not processes_of(inst.id), 15, what="agent processes gone")
    wait_until(lambda: echo.instance(inst.id).state == STOPPED, 5, what="instance STOPPED")
    assert echo.instance(inst.id).reason == "stopped on request"
    # min_replicas = 1: another job takes its place.
    assert echo.wait_ready("echo", other_than=inst.id).launcher_ref != inst.launcher_ref


def test_the_controller_reconnects_after_sshd_restarts(echo: System) -> None:
    assert echo.sshd is not None
    inst = echo.wait_ready("echo")
    echo.sshd.stop()  # the listener and the controller's connection
    time.sleep(3)  # several polls fail
    # A lost login node is not a lost job: nothing changes, requests still flow.
    still = echo.instance(inst.id)
    assert (still.state, still.launcher_ref) == (READY, inst.launcher_ref)
    echo.ask("echo")
    echo.sshd.start()
    # Stopping needs scancel over SSH, the replacement sbatch: both work again.
    echo.stop_instance(inst.id)
    wait_until(job_gone(echo, inst.launcher_ref), 30, 0.2, what="job cancelled after reconnect")
    successor = echo.wait_ready("echo", other_than=inst.id)
    # Its job was submitted over the new connection, and it is the one in the queue.
    assert echo.cluster.active_jobs(echo.prefix) == {
        successor.launcher_ref: f"{echo.prefix}-{successor.id}"
    }
    echo.ask("echo")


def test_a_restarted_controller_adopts_its_jobs(echo: System) -> None:
    before = echo.wait_ready("echo")
    jobs_before = echo.cluster.active_jobs(echo.prefix)
    echo.controller.proc.kill()
    # As if the controller had died right after sbatch: the job id was never stored.
    with contextlib.closing(sqlite3.connect(echo.controller.state_dir / "kscope.db")) as db:
        db.execute("UPDATE instances SET launcher_ref = '' WHERE id = ?", (before.id,))
        db.commit()
    echo.controller = restart_controller(echo.controller, echo.tmp)
    wait_until(
        lambda: any(a.instance_id == before.id for a in echo.controller.list_agents()),
        20, 0.2, what="agent attached again",
    )  # fmt: skip
    wait_until(lambda: echo.instance(before.id).launcher_ref == before.launcher_ref, 10,
               what="job adopted by its name")  # fmt: skip
    after = echo.instances("echo")
    assert [(i.id, i.launcher_ref, i.state) for i in after] == [
        (before.id, before.launcher_ref, READY)
    ]
    time.sleep(3)  # a few polls: nothing is submitted again
    assert echo.cluster.active_jobs(echo.prefix) == jobs_before
    echo.ask("echo")


# --- SSH host keys --------------------------------------------------------------------------


def _other_host_key(tmp: Path) -> str:
    key = tmp / "impostor"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True,
                   timeout=30)  # fmt: skip
    return " ".join(key.with_suffix(".pub").read_text().split()[:2])


def test_a_wrong_host_key_is_refused_with_a_clear_reason(
    cluster: Cluster, prefix: str, tmp_path: Path
) -> None:
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[127.0.0.1]:{cluster.ssh_port} {_other_host_key(tmp_path)}\n")
    upstream = start_upstream(tmp_path)
    catalog = f"""
[[models]]
name = "guarded"
engine = "openai"
upstream_url = "{upstream.url}"
launcher = "slurm"
min_replicas = 1
"""
    guarded_prefix = prefix + "w"
    env = controller_env(cluster, tmp_path, guarded_prefix, cluster.ssh_port, wrong)
    controller = start_controller(tmp_path, catalog, env=env)
    try:

        def refused() -> bool:
            return any(
                i.state == FAILED and "host key not trusted" in i.reason
                for i in controller.list_instances(include_ended=True)
            )

        wait_until(refused, 15, 0.2, what="launch refused for the host key")
        reason = next(i.reason for i in controller.list_instances(include_ended=True))
        assert str(wrong) in reason and "Refusing to connect" in reason
        assert cluster.active_jobs(guarded_prefix) == {}
    finally:
        controller.proc.stop()
        cluster.cancel_all(guarded_prefix)
        upstream.proc.stop()


async def test_host_key_checking_is_off_only_when_asked(cluster: Cluster, tmp_path: Path) -> None:
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[127.0.0.1]:{cluster.ssh_port} {_other_host_key(tmp_path)}\n")
    target = SshTarget("127.0.0.1", cluster.ssh_port, "root", cluster.ssh_key, wrong)
    checked = SshRunner(target)
    with pytest.raises(RemoteRefused, match="host key not trusted"):
        await checked.run("true", timeout_s=10)
    await checked.close()
    unchecked = SshRunner(SshTarget(**{**target.__dict__, "check_host_key": False}))
    try:
        result = await unchecked.run("echo $SLURM_CONF", timeout_s=10)
        assert result.ok and result.stdout.strip() == str(cluster.slurm_conf)
    finally:
        await unchecked.close()


# --- on a login node: sbatch, squeue and scancel run locally ---------------------------------


async def test_on_a_login_node_jobs_are_submitted_with_local_sbatch(
    cluster: Cluster, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLURM_CONF", str(cluster.slurm_conf))  # as a login node's shell has
    local_prefix = prefix + "l"
    launcher = SlurmLauncher(
        LocalRunner(),
        SlurmOptions(agent_python=sys.executable, job_prefix=local_prefix, poll_interval_s=0.5,
                     log_dir=str(tmp_path / "job-logs")),
    )  # fmt: skip
    spec = ModelSpec(name="m", engine=EngineKind.OPENAI, upstream_url="http://127.0.0.1:1/v1",
                     launcher="slurm")  # fmt: skip
    try:
        # The agent finds no controller at 127.0.0.1:1; the job runs all the same.
        job = await launcher.launch(LaunchSpec("m-local1", spec, "127.0.0.1:1", "token"))
        assert cluster.active_jobs(local_prefix) == {job: f"{local_prefix}-m-local1"}

        async def phase() -> LauncherPhase:
            await asyncio.sleep(0.5)
            return (await launcher.observe([job]))[job].phase

        for _ in range(40):
            if await phase() is LauncherPhase.RUNNING:
                break
        assert (await launcher.observe([job]))[job].phase is LauncherPhase.RUNNING
        await launcher.stop(job)
        for _ in range(40):
            if await phase() is LauncherPhase.ENDED:
                break
        ended = (await launcher.observe([job]))[job]
        assert ended.phase is LauncherPhase.ENDED
        assert f"SLURM job {job} was cancelled" in ended.reason
    finally:
        await launcher.close(stop_instances=True)
        cluster.cancel_all(local_prefix)


# --- walltime rotation ----------------------------------------------------------------------


@dataclass
class Traffic:
    """Requests sent back to back from threads until stopped; every outcome kept."""

    system: System
    model: str
    ok: int = 0
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self, streams: int, unary: int) -> None:
        for stream in [True] * streams + [False] * unary:
            thread = threading.Thread(target=self._loop, args=(stream,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _loop(self, stream: bool) -> None:
        client = self.system.client(timeout=30)
        while not self._stop.is_set():
            try:
                if stream:
                    chunks = list(client.chat.completions.create(
                        model=self.model, messages=[{"role": "user", "content": "hi"}],
                        max_tokens=40, stream=True, stream_options={"include_usage": True},
                    ))  # fmt: skip
                    usage = chunks[-1].usage
                    assert usage is not None and usage.completion_tokens == 40
                else:
                    self.system.ask(self.model)
                self.ok += 1
            except Exception as exc:  # every failure is a finding: keep them all
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


def test_walltime_rotation_loses_no_request(cluster: Cluster, prefix: str, tmp_path: Path) -> None:
    """A 1-minute time limit, rotation lead capped at half of it (30 s): the
    replacement is submitted ~30 s before the limit, the old job drained once
    the replacement is READY; requests run throughout."""
    paced = start_upstream(tmp_path, "--token-interval-ms", "20", name="paced")
    catalog = f"""
[[models]]
name = "rotating"
engine = "openai"
upstream_url = "{paced.url}"
launcher = "slurm"
min_replicas = 1
expected_startup_s = 3

[models.slurm]
time_limit = "1"
"""
    rot_prefix = prefix + "r"
    env = controller_env(cluster, tmp_path, rot_prefix, cluster.ssh_port, cluster.known_hosts,
                         KSCOPE_SLURM_ROTATION_LEAD_S="100")  # fmt: skip
    controller = start_controller(tmp_path, catalog, env=env)
    facade = start_facade(tmp_path, controller, api_key=API_KEY)
    system = System(tmp_path, cluster, rot_prefix, controller, facade, [paced])
    traffic = Traffic(system, "rotating")
    try:
        first = system.wait_ready("rotating")
        traffic.start(streams=2, unary=1)
        wait_until(job_gone(system, first.launcher_ref), 75, 0.5, what="first job rotated out")
        successor = system.wait_ready("rotating", other_than=first.id)
        time.sleep(2)  # traffic keeps flowing to the successor
        traffic.stop()
        assert traffic.errors == []
        assert traffic.ok > 20
        retired = system.instance(first.id)
        assert retired.state == STOPPED, retired.reason
        # Exactly one job is left: the successor's (its own rotation is ~25 s away).
        assert cluster.active_jobs(rot_prefix) == {
            successor.launcher_ref: f"{rot_prefix}-{successor.id}"
        }
        # The reconciler rotated: a launch for the expiring job, then its drain.
        decided = decisions_for(controller, "rotating")
        rotations = [
            n for n, d in enumerate(decided)
            if d.action == "launch" and d.reason.endswith("(1 more near their time limit)")
        ]  # fmt: skip
        drains = [
            n for n, d in enumerate(decided)
            if d.action == "drain" and d.instance_id == first.id
            and d.reason.endswith("its replacement is ready")
        ]  # fmt: skip
        assert len(rotations) == 1 and len(drains) == 1, decided
        assert rotations[0] < drains[0], decided
    finally:
        traffic.stop()
        system.shut_down()


# --- the idle policy and a job that waits for the cluster ---------------------------------

IDLE_TIMEOUT_S = 2.0
PENDING = control_pb2.INSTANCE_STATE_PENDING


def job_state_and_reason(cluster: Cluster, job_id: str) -> tuple[str, str]:
    """squeue's state and reason for one job ("" once squeue forgot it)."""
    out = cluster.run("squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T|%r").strip()
    state, _, reason = out.partition("|")
    return state, reason


def occupy_the_node(cluster: Cluster, prefix: str) -> tuple[str, int]:
    """Submit a job (PREFIX-blocker) holding every idle CPU of the node; once it
    runs, return its id and CPU count: jobs submitted after it wait for Resources."""
    # sinfo %C: allocated/idle/other/total CPUs (another job, the echo fixture's, may run).
    idle = int(cluster.run("sinfo", "-h", "-N", "-o", "%C").split("/")[1])
    assert idle > 0, "no idle CPU on the test node"
    blocker = cluster.run("sbatch", "--parsable", f"--job-name={prefix}-blocker", "--ntasks=1",
                          f"--cpus-per-task={idle}", "--time=10", "--output=/dev/null",
                          "--wrap", "sleep 300").strip()  # fmt: skip
    wait_until(lambda: job_state_and_reason(cluster, blocker)[0] == "RUNNING", 30, 0.2,
               what=f"blocker job {blocker} RUNNING")  # fmt: skip
    return blocker, idle


def decisions_for(controller: Controller, model: str) -> list[control_pb2.Decision]:
    """The reconciler's decisions about `model`, oldest first."""
    with controller.channel() as channel:
        reply = controller.stub(channel).ListDecisions(
            control_pb2.ListDecisionsRequest(model=model), timeout=5
        )
    return list(reversed(reply.decisions))


@pytest.mark.autoscale
def test_idle_policy_keeps_a_pending_job_and_scales_to_zero_once_it_served(
    cluster: Cluster, prefix: str, tmp_path: Path
) -> None:
    """A job that waits for the cluster is capacity on the way: the idle policy
    leaves it alone however long it pends, and nothing is submitted beside it.
    Once it runs and has served, no traffic for idle_timeout_s takes the model
    to zero instances and its job leaves the queue."""
    idle_prefix, blocker_prefix = prefix + "i", prefix + "b"
    upstream = start_upstream(tmp_path)
    system: System | None = None
    try:
        blocker, cpus = occupy_the_node(cluster, blocker_prefix)
        # The model's job asks for exactly what the blocker holds: only the
        # blocker's end lets it start, not another job of the cluster ending.
        catalog = f"""
[[models]]
name = "idler"
engine = "openai"
upstream_url = "{upstream.url}"
launcher = "slurm"
min_replicas = 0
idle_timeout_s = {IDLE_TIMEOUT_S}
expected_startup_s = 3

[models.slurm]
time_limit = "10"
cpus = {cpus}
"""
        env = controller_env(cluster, tmp_path, idle_prefix, cluster.ssh_port,
                             cluster.known_hosts)  # fmt: skip
        controller = start_controller(tmp_path, catalog, env=env)
        facade = start_facade(tmp_path, controller, api_key=API_KEY)
        system = System(tmp_path, cluster, idle_prefix, controller, facade, [upstream])

        # Demand: the first request finds no instance and is answered 503.
        with pytest.raises(openai.APIStatusError) as refused:
            system.ask("idler")
        assert refused.value.status_code == 503, refused.value
        wait_until(lambda: [i.state for i in system.instances("idler")] == [PENDING], 20, 0.2,
                   what="one instance PENDING")  # fmt: skip
        [inst] = system.instances("idler")
        assert cluster.active_jobs(idle_prefix) == {inst.launcher_ref: f"{idle_prefix}-{inst.id}"}
        # Just submitted, its reason is None until the scheduler has looked at it.
        seen: list[tuple[str, str]] = []

        def waits_for_the_blocker() -> bool:
            seen.append(job_state_and_reason(cluster, inst.launcher_ref))
            return seen[-1][0] == "PENDING" and seen[-1][1] in ("Resources", "Priority")

        wait_until(waits_for_the_blocker, 20, 0.2, what="job PENDING for Resources")
        reason = seen[-1][1]
        waiting = f"SLURM job {inst.launcher_ref} is PENDING ({reason})"
        wait_until(lambda: waiting in system.instance(inst.id).reason, 10, 0.2, what=waiting)
        # A client that waits is told why, in SSE comments, until its wait runs out.
        body = {"model": "idler", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        headers = {"Authorization": f"Bearer {API_KEY}", "X-KScope-Wait": "2"}
        with httpx.stream("POST", f"{facade.base_url}/v1/chat/completions", json=body,
                          headers=headers, timeout=20) as held:  # fmt: skip
            lines = [line for line in held.iter_lines() if line]
        assert held.status_code == 200 and lines[0].startswith(": waiting for model 'idler'")
        assert f"PENDING ({reason})" in lines[0], lines
        assert '"model_not_ready"' in lines[-2] and lines[-1] == "data: [DONE]", lines

        # Three idle timeouts and a few reconcile passes later, without any traffic:
        # the same instance, still PENDING, its job still waiting, nothing drained.
        watch_until = time.monotonic() + 3 * IDLE_TIMEOUT_S + 4
        while time.monotonic() < watch_until:
            listed = system.instances("idler", include_ended=True)
            assert [(i.id, i.state) for i in listed] == [(inst.id, PENDING)], listed
            assert job_state_and_reason(cluster, inst.launcher_ref)[0] == "PENDING"
            time.sleep(0.5)
        decided = [(d.action, d.reason) for d in decisions_for(controller, "idler")]
        assert decided == [("launch", "0 of 1 wanted instances")], decided
        assert cluster.active_jobs(idle_prefix) == {inst.launcher_ref: f"{idle_prefix}-{inst.id}"}

        # The cluster frees up: the job that waited starts and serves.
        cluster.run("scancel", blocker)
        freed_at = time.time()
        ready = system.wait_ready("idler", timeout_s=30)
        assert (ready.id, ready.launcher_ref) == (inst.id, inst.launcher_ref)
        assert job_state_and_reason(cluster, inst.launcher_ref)[0] == "RUNNING"
        system.ask("idler")

        # No traffic: after idle_timeout_s the model is at zero instances.
        wait_until(job_gone(system, inst.launcher_ref), 30, 0.2, what="idle job left the queue")
        wait_until(lambda: system.instance(inst.id).state == STOPPED, 10, 0.2,
                   what="instance STOPPED")  # fmt: skip
        assert system.instances("idler") == []
        time.sleep(2)  # a few passes: nothing is launched again without demand
        assert cluster.active_jobs(idle_prefix) == {}
        assert len(system.instances("idler", include_ended=True)) == 1
        decisions = decisions_for(controller, "idler")
        assert [d.action for d in decisions].count("launch") == 1, decisions
        drains = [d for d in decisions if d.action in ("drain", "stop")]
        assert drains and drains[0].action == "drain", decisions
        assert drains[0].reason == "1 instances, 0 wanted", decisions
        assert all(d.time_unix_seconds > freed_at for d in drains), decisions
        assert drains[0].instance_id == inst.id, decisions
    finally:
        if system is not None:
            system.shut_down()
        else:
            upstream.proc.stop()
        cluster.cancel_all(blocker_prefix)  # the blocker, whatever became of the test
        cluster.cancel_all(idle_prefix)


# --- a real vLLM inside a job, from a cold start -------------------------------------------

VLLM_ARGS = [
    "--max-model-len",
    "512",
    "--enforce-eager",
    "--kv-cache-memory-bytes",
    "64M",
    "--dtype",
    "float32",
]


@pytest.mark.vllm
def test_cold_model_becomes_a_slurm_job_serving_vllm(
    cluster: Cluster, prefix: str, tmp_path: Path, tiny_model: Path, vllm_python: Path
) -> None:
    catalog = f"""
[[models]]
name = "tiny"
engine = "vllm"
model_path = "{tiny_model}"
launcher = "slurm"
expected_startup_s = 60
engine_args = {json.dumps(VLLM_ARGS)}
env = {{ KSCOPE_VLLM_PYTHON = "{vllm_python}" }}

[models.slurm]
time_limit = "30"
cpus = 2
"""
    v_prefix = prefix + "v"
    env = controller_env(cluster, tmp_path, v_prefix, cluster.ssh_port, cluster.known_hosts)
    controller = start_controller(tmp_path, catalog, env=env)
    facade = start_facade(tmp_path, controller, api_key=API_KEY)
    system = System(tmp_path, cluster, v_prefix, controller, facade)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    try:
        first = httpx.post(f"{facade.base_url}/v1/chat/completions", json=body, headers=headers,
                           timeout=10)  # fmt: skip
        assert first.status_code == 503
        assert first.json()["error"]["code"] == "model_not_ready"
        # While it starts, the 503 names the job and its state.
        seen: list[str] = []

        def names_the_job() -> bool:
            reply = httpx.post(f"{facade.base_url}/v1/chat/completions", json=body,
                               headers=headers, timeout=10)  # fmt: skip
            assert reply.status_code == 503, reply.text
            assert int(reply.headers["retry-after"]) >= 1
            seen.append(reply.json()["error"]["message"])
            return "SLURM job" in seen[-1]

        wait_until(names_the_job, 20, 0.2, what="a 503 naming the SLURM job")
        [inst] = controller.list_instances(model="tiny")
        assert f"SLURM job {inst.launcher_ref} is " in seen[-1]
        assert any(state in seen[-1] for state in ("PENDING", "RUNNING")), seen[-1]
        # Exactly one job for the demand, named after its instance.
        assert cluster.active_jobs(v_prefix) == {inst.launcher_ref: f"{v_prefix}-{inst.id}"}

        ready = system.wait_ready("tiny", timeout_s=240)
        assert ready.id == inst.id
        answer = system.client().chat.completions.create(  # the openai SDK
            model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=4
        )
        assert answer.choices[0].message.content
        assert answer.usage is not None and answer.usage.completion_tokens == 4
        engine_pids = processes_of(inst.id)
        assert len(engine_pids) >= 2  # the agent and vLLM's processes

        # Stop: drained, cancelled, gone from the queue, nothing left on the node.
        system.stop_instance(inst.id)
        wait_until(job_gone(system, inst.launcher_ref), 60, 0.5, what="vLLM job left the queue")
        wait_until(lambda: not processes_of(inst.id), 30, 0.5, what="agent and vLLM gone")
    finally:
        system.shut_down()
    # The controller's shutdown cancelled the replacement the demand asked for.
    wait_until(lambda: cluster.active_jobs(v_prefix) == {}, 30, 0.5, what="no job left")
    with contextlib.closing(sqlite3.connect(controller.state_dir / "kscope.db")) as db:
        ids = [row[0] for row in db.execute("SELECT id FROM instances")]
    assert len(ids) == 2  # the stopped one and its replacement
    wait_until(lambda: not any(processes_of(i) for i in ids), 30, 0.5, what="nothing left")
