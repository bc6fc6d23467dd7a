"""The test SLURM cluster (scripts/slurm-up.sh) as tests see it: its settings,
its queue, a private sshd a test may stop and start, and the processes a job
left behind. Nothing here kills anything it did not start itself."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.procs import Proc

SLURM_DIR = Path(os.environ.get("KSCOPE_SLURM_DIR", "/tmp/kscope-slurm"))
SSHD = "/usr/sbin/sshd"


@dataclass(frozen=True)
class Cluster:
    slurm_conf: Path
    host: str
    ssh_port: int
    """The sshd slurm-up started."""
    ssh_key: Path
    known_hosts: Path
    host_key_pub: Path
    sshd_config: Path

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.slurm_conf)}

    def run(self, *argv: str) -> str:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=30, env=self.env(), check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
        return done.stdout

    def jobs(self, prefix: str) -> dict[str, tuple[str, str]]:
        """Job id → (state, name) of every job named PREFIX-…, finished ones too."""
        out = self.run("squeue", "-h", "-t", "all", "-o", "%i|%T|%j")
        jobs = {}
        for line in out.splitlines():
            job_id, state, name = line.split("|", 2)
            if name.startswith(f"{prefix}-"):
                jobs[job_id] = (state, name)
        return jobs

    def active_jobs(self, prefix: str) -> dict[str, str]:
        """Job id → name of PREFIX-… jobs that wait or run (COMPLETING counts)."""
        ended = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                 "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}  # fmt: skip
        return {j: name for j, (state, name) in self.jobs(prefix).items() if state not in ended}

    def cancel_all(self, prefix: str) -> None:
        """Safety net after a test: cancel what is left of its own jobs."""
        leftover = list(self.active_jobs(prefix))
        if leftover:
            subprocess.run(["scancel", *leftover], env=self.env(), timeout=30, check=False)


def cluster_or_fail() -> Cluster:
    """The running test cluster; fails (never skips) the test when it is not up."""
    env_file = SLURM_DIR / "env.json"
    hint = "SLURM is not up: run `make slurm-up` (scripts/slurm-up.sh)"
    if not env_file.exists():
        pytest.fail(f"{hint}; {env_file} is missing")
    data = json.loads(env_file.read_text())
    cluster = Cluster(
        slurm_conf=Path(data["slurm_conf"]),
        host=data["host"],
        ssh_port=int(data["ssh_port"]),
        ssh_key=Path(data["ssh_key"]),
        known_hosts=Path(data["known_hosts"]),
        host_key_pub=Path(data["host_key_pub"]),
        sshd_config=Path(data["sshd_config"]),
    )
    try:
        cluster.run("squeue", "-h", "-o", "%i")
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"{hint}; squeue fails: {exc}")
    try:
        with socket.create_connection(("127.0.0.1", cluster.ssh_port), timeout=5):
            pass
    except OSError as exc:
        pytest.fail(f"{hint}; its sshd on 127.0.0.1:{cluster.ssh_port} does not answer: {exc}")
    return cluster


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        found += kids
        todo += kids
    return found


class PrivateSshd:
    """An sshd of this test's own on a free port, with the cluster's host key and
    authorized keys: a test can stop it (connections and all) and start it again."""

    def __init__(self, cluster: Cluster, tmp: Path):
        self.cluster = cluster
        self.port = free_port()
        self.config = tmp / "sshd_config"
        lines = []
        for line in cluster.sshd_config.read_text().splitlines():
            if line.startswith("Port "):
                line = f"Port {self.port}"
            elif line.startswith("PidFile "):
                line = f"PidFile {tmp / 'sshd.pid'}"
            lines.append(line)
        self.config.write_text("\n".join(lines) + "\n")
        self.known_hosts = tmp / "known_hosts"
        host_key = " ".join(cluster.host_key_pub.read_text().split()[:2])
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_key}\n")
        self.log = tmp / "sshd.log"
        self.proc: Proc | None = None

    def start(self) -> None:
        self.proc = Proc([SSHD, "-D", "-e", "-f", str(self.config)], self.log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            time.sleep(0.05)
        raise TimeoutError(f"sshd on port {self.port} did not start:\n{self.proc.log()}")

    def stop(self) -> None:
        """Stop the listener and every connection it serves (sshd puts each
        connection in a session of its own, out of the listener's group)."""
        if self.proc is None:
            return
        for pid in descendants(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.kill()
        self.proc = None


def processes_of(instance_id: str) -> list[int]:
    """Processes whose environment names the instance: its agent, its engine and
    their children (they inherit KSCOPE_INSTANCE_ID)."""
    needle = f"KSCOPE_INSTANCE_ID={instance_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def vllm_api_key(instance_id: str) -> str:
    """The API key only the instance's agent gave its vLLM. Tests run as the
    same user, so they may read vLLM's environment; other users cannot."""
    for pid in processes_of(instance_id):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"vllm.entrypoints" in cmdline:
            for entry in environ:
                if entry.startswith(b"VLLM_API_KEY="):
                    return entry.split(b"=", 1)[1].decode()
    raise AssertionError(f"no vLLM process with an API key for {instance_id}")
