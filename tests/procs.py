"""Real processes for tests: started in their own process group, found by port
file (port 0 everywhere), stopped by group. Nothing is ever killed by name."""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
from prometheus_client.parser import text_string_to_metric_families

from kscope.v1 import control_pb2, control_pb2_grpc, identity_pb2, identity_pb2_grpc
from kscope_common.pki import CONTROLLER_DNS_NAME

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def clean_environment() -> dict[str, str]:
    """This process's environment less KSCOPE_* and PROXY_* settings: a
    developer's KSCOPE_MULTIPLEX=0 must not change what a test tests."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.upper().startswith(("KSCOPE_", "PROXY_"))
    }


class Proc:
    """A child process in its own session (so its whole group can be signalled)."""

    def __init__(self, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None):
        self.argv = list(argv)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**clean_environment(), "PYTHONUNBUFFERED": "1", **(env or {})},
                cwd=ROOT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the whole group, as a crash would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.popen.wait(10)

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM the group, then SIGKILL it after the grace period."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)


def process_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def wait_port_file(path: Path, proc: Proc, timeout_s: float = 30.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            text = path.read_text().strip()
            if text.isdigit():
                return int(text)
        if not proc.alive():
            raise RuntimeError(f"{proc.argv[0]} exited early:\n{proc.log()[-4000:]}")
        time.sleep(0.05)
    raise TimeoutError(f"no port file {path} after {timeout_s}s:\n{proc.log()[-4000:]}")


@dataclass
class Controller:
    proc: Proc
    port: int
    state_dir: Path
    catalog: Path
    log_dir: Path
    restarts: int = 0
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment it was started with (kept across restarts)."""

    @property
    def address(self) -> str:
        """The public port: enrollment, and operators with an admin key."""
        return f"127.0.0.1:{self.port}"

    @property
    def ca_path(self) -> Path:
        return self.state_dir / "tls" / "ca.pem"

    @property
    def ca_pem(self) -> bytes:
        return self.ca_path.read_bytes()

    @property
    def admin_key(self) -> str:
        return (self.state_dir / "admin-key").read_text().strip()

    def channel(self, as_admin: bool = True) -> grpc.Channel:
        """An operator's channel: server-authenticated TLS with the cluster CA;
        `as_admin`: every call carries the bootstrap admin key."""
        channel = grpc.secure_channel(
            self.address, grpc.ssl_channel_credentials(self.ca_pem),
            [("grpc.ssl_target_name_override", CONTROLLER_DNS_NAME)],
        )  # fmt: skip
        if as_admin:
            return grpc.intercept_channel(channel, _Bearer(self.admin_key))
        return channel

    @property
    def admin(self) -> tuple[tuple[str, str], ...]:
        """Call metadata with the bootstrap admin key."""
        return (("authorization", f"Bearer {self.admin_key}"),)

    def stub(self, channel: grpc.Channel) -> control_pb2_grpc.ControlServiceStub:
        return control_pb2_grpc.ControlServiceStub(channel)

    def list_instances(
        self, model: str = "", include_ended: bool = False
    ) -> list[control_pb2.Instance]:
        with self.channel() as channel:
            reply = self.stub(channel).ListInstances(
                control_pb2.ListInstancesRequest(model=model, include_ended=include_ended),
                timeout=5,
            )
        return list(reply.instances)

    def list_agents(self) -> list[control_pb2.Agent]:
        with self.channel() as channel:
            return list(
                self.stub(channel).ListAgents(control_pb2.ListAgentsRequest(), timeout=5).agents
            )

    def enrollment_token(self, kind: str, name: str, expires_in_s: int = 0) -> str:
        """A facade, host or operator enrollment token (as `kscope facades add`)."""
        kinds = {
            "facade": identity_pb2.ENROLLMENT_KIND_FACADE,
            "host": identity_pb2.ENROLLMENT_KIND_HOST,
            "operator": identity_pb2.ENROLLMENT_KIND_OPERATOR,
        }
        with self.channel() as channel:
            reply = identity_pb2_grpc.IdentityServiceStub(channel).CreateEnrollment(
                identity_pb2.CreateEnrollmentRequest(
                    kind=kinds[kind], name=name, expires_in_seconds=expires_in_s
                ),
                timeout=5,
            )
        return reply.token

    def revoke(self, kind: str, name: str) -> None:
        kinds = {
            "facade": identity_pb2.ENROLLMENT_KIND_FACADE,
            "host": identity_pb2.ENROLLMENT_KIND_HOST,
        }
        with self.channel() as channel:
            identity_pb2_grpc.IdentityServiceStub(channel).RevokeEnrollment(
                identity_pb2.RevokeEnrollmentRequest(kind=kinds[kind], name=name), timeout=5
            )

    def facade_env(self, name: str) -> dict[str, str]:
        """What a facade enrolls with."""
        return {
            "KSCOPE_ENROLL_TOKEN": self.enrollment_token("facade", name),
            "KSCOPE_TLS_CA": str(self.ca_path),
        }


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    """Adds `authorization: Bearer KEY` to every call on a channel."""

    def __init__(self, key: str):
        self._metadata = ("authorization", f"Bearer {key}")

    def _with_key(self, details: Any) -> Any:
        return _Details(
            details.method, details.timeout, [*(details.metadata or ()), self._metadata],
            details.credentials, getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )  # fmt: skip

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_key(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_key(details), request)


class _Details(
    collections.namedtuple(
        "_Details",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


def start_controller(
    tmp: Path,
    catalog_toml: str,
    port: int = 0,
    state_dir: Path | None = None,
    name: str = "controller",
    env: dict[str, str] | None = None,
) -> Controller:
    state_dir = state_dir or tmp / "state"
    catalog = tmp / "catalog.toml"
    catalog.write_text(catalog_toml)
    port_file = tmp / f"{name}.port"
    port_file.unlink(missing_ok=True)
    proc = Proc(
        [PYTHON, "-m", "controller.main", "--port", str(port), "--port-file", str(port_file),
         "--state-dir", str(state_dir), "--catalog", str(catalog)],
        tmp / "logs" / f"{name}.log",
        env={"KSCOPE_RECONNECT_GRACE_S": "20", "KSCOPE_REPORT_INTERVAL_S": "0.5", **(env or {})},
    )  # fmt: skip
    bound = wait_port_file(port_file, proc)
    return Controller(proc, bound, state_dir, catalog, tmp / "logs", env=dict(env or {}))


def restart_controller(ctl: Controller, tmp: Path) -> Controller:
    """Start a controller again on the same port and state (after a kill)."""
    fresh = start_controller(
        tmp, ctl.catalog.read_text(), port=ctl.port, state_dir=ctl.state_dir,
        name=f"controller-{ctl.restarts + 1}", env=ctl.env,
    )  # fmt: skip
    fresh.restarts = ctl.restarts + 1
    return fresh


def stop_instances_left_behind(state_dir: Path) -> None:
    """Safety net after a test: stop the process group of every local instance the
    controller's database knows, if that exact process (pid and start time) lives."""
    db = state_dir / "kscope.db"
    if not db.exists():
        return
    with contextlib.closing(sqlite3.connect(db)) as conn:
        refs = [
            r[0] for r in conn.execute("SELECT launcher_ref FROM instances WHERE launcher='local'")
        ]
    for ref in refs:
        pid_text, _, start = ref.partition(":")
        if not pid_text.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid_text}/stat").read_text()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2 :].split()[19] == start:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(pid_text), signal.SIGKILL)


@dataclass
class Facade:
    proc: Proc
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_facade(
    tmp: Path,
    controller: Controller,
    api_key: str | None = None,
    name: str = "facade",
    multiplex: bool = True,
    env: dict[str, str] | None = None,
) -> Facade:
    """A facade, enrolled with a facade token of its own name; without api_key
    (and without KSCOPE_REQUIRE_KEY in env) /v1 is open."""
    port_file = tmp / f"{name}.port"
    argv = [PYTHON, "-m", "facade.main", "--port", "0", "--port-file", str(port_file),
            "--controller", controller.address]  # fmt: skip
    env = {
        # Secrets travel in the environment, never on a command line.
        **({"KSCOPE_API_KEY": api_key} if api_key else {}),
        "KSCOPE_MULTIPLEX": "1" if multiplex else "0",
        "KSCOPE_REQUIRE_KEY": "1" if api_key else "0",
        **controller.facade_env(f"{name}-{time.monotonic_ns()}"),
        **(env or {}),
    }
    proc = Proc(argv, tmp / "logs" / f"{name}.log", env=env)
    return Facade(proc, wait_port_file(port_file, proc))


@dataclass
class Upstream:
    """bench/upstream.py: a minimal OpenAI-compatible server (a load-testing tool)."""

    proc: Proc
    port: int
    extra: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


def start_upstream(tmp: Path, *extra: str, name: str = "upstream") -> Upstream:
    port_file = tmp / f"{name}.port"
    proc = Proc(
        [
            PYTHON,
            str(ROOT / "bench" / "upstream.py"),
            "--port",
            "0",
            "--port-file",
            str(port_file),
            *extra,
        ],
        tmp / "logs" / f"{name}.log",
    )
    return Upstream(proc, wait_port_file(port_file, proc), list(extra))


def wait_until(
    predicate: object, timeout_s: float, interval_s: float = 0.1, what: str = ""
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(interval_s)
    raise TimeoutError(f"not true within {timeout_s}s: {what}")


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
"""Prometheus samples by (name, sorted labels)."""


def parse_metrics(text: str) -> Samples:
    """Prometheus text as prometheus_client's own parser reads it."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape_metrics(url: str) -> Samples:
    """GET a /metrics endpoint (it must answer in Prometheus text format) and parse it."""
    reply = httpx.get(url, timeout=10)
    reply.raise_for_status()
    assert reply.headers["content-type"].startswith("text/plain")
    return parse_metrics(reply.text)


def run_kscope(ctl: Controller, *args: str, key: str = "") -> subprocess.CompletedProcess[str]:
    """The `kscope` command against `ctl` (its CA; `key` as KSCOPE_API_KEY)."""
    env = {"PATH": "/usr/bin:/bin", "KSCOPE_CONTROLLER": ctl.address,
           "KSCOPE_TLS_CA": str(ctl.ca_path)}  # fmt: skip
    if key:
        env["KSCOPE_API_KEY"] = key
    return subprocess.run(
        [str(ROOT / ".venv" / "bin" / "kscope"), *args],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip


@dataclass
class Stack:
    """A fake upstream, a controller with one `openai` model on it, a facade."""

    upstream: Upstream
    controller: Controller
    facade: Facade


def wait_model_ready(controller: Controller, model: str, timeout_s: float = 60) -> None:
    ready = control_pb2.INSTANCE_STATE_READY
    wait_until(lambda: any(i.state == ready for i in controller.list_instances(model)),
               timeout_s, what=f"{model} ready")  # fmt: skip


@contextlib.contextmanager
def one_model_stack(
    tmp: Path,
    *upstream_args: str,
    model: str = "one",
    catalog: str = "",
    facade_env: dict[str, str] | None = None,
) -> Iterator[Stack]:
    """Start the three (the model with min_replicas 1 and `catalog`'s extra
    lines), wait until the model is READY, and stop everything afterwards."""
    upstream = start_upstream(tmp, *upstream_args)
    controller: Controller | None = None
    facade: Facade | None = None
    try:
        controller = start_controller(
            tmp,
            f'[[models]]\nname = "{model}"\nengine = "openai"\nupstream_url = "{upstream.url}"\n'
            f"min_replicas = 1\n{catalog}",
        )
        facade = start_facade(tmp, controller, env=facade_env)
        wait_model_ready(controller, model)
        yield Stack(upstream, controller, facade)
    finally:
        if facade is not None:
            facade.proc.stop()
        if controller is not None:
            controller.proc.stop()
            stop_instances_left_behind(controller.state_dir)
        upstream.proc.stop()


def agent_metrics_env(port_file: Path) -> str:
    """A catalog entry's env (TOML inline-table items) giving its agents a metrics port."""
    return f'KSCOPE_AGENT_METRICS_PORT = "0", KSCOPE_AGENT_METRICS_PORT_FILE = "{port_file}"'


def assert_agent_counts(port_file: Path, model: str, send: Callable[[], object]) -> None:
    """The positive control beside an unchanged `agent_requests`: a request the
    model accepts, sent now by `send`, is counted, so the count is this model's."""
    before = agent_requests(port_file, model)
    send()
    wait_until(lambda: agent_requests(port_file, model) > before, 10,
               what=f"{model}'s agent to count a request")  # fmt: skip


def vllm_cpu_args(max_model_len: int) -> list[str]:
    """vLLM engine arguments for the tests' tiny models on this CPU build."""
    return [
        "--max-model-len", str(max_model_len), "--enforce-eager",
        "--kv-cache-memory-bytes", "64M",
        # float32: bf16 on this CPU lets oneDNN pick AMX kernels, which the VM kills with SIGILL.
        "--dtype", "float32",
    ]  # fmt: skip


def agent_requests(port_file: Path, model: str) -> float:
    """Requests the model's agent counted (kscope_agent_requests_total): an
    unchanged count proves a request was answered before it reached an agent."""
    port = int(port_file.read_text())
    scraped = scrape_metrics(f"http://127.0.0.1:{port}/metrics")
    return sum(
        v for (name, labels), v in scraped.items()
        if name == "kscope_agent_requests_total" and ("model", model) in labels
    )  # fmt: skip
