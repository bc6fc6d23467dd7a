"""A host agent: one per machine (a Mac under launchd), serving the models on
its own disk when the controller asks.

It registers without an instance, listing the models it offers and its memory.
A LoadModelCommand starts the instance's own agent (`node_agent.main`, in its
own process group) for a model it offers; that agent registers with the
controller like any other and serves the requests. An UnloadModelCommand (the
model was idle past its idle timeout, or the controller stops it) sends the
instance SIGTERM: it drains and exits. Every load report lists the instances and
whether they run, which is what the controller's host launcher observes.

start ─▶ register (host) ─▶ load/unload on command ─▶ SIGTERM: unload all ─▶ exit
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.core import Metric

from kscope.v1 import agent_pb2
from kscope_common.cli import AgentCommand, agent_argv
from kscope_common.metrics import gauge, maybe_serve
from kscope_common.tls import EnrollmentError
from node_agent.controller_link import (
    AgentIdentity,
    ControllerLink,
    Orphaned,
    RegistrationRefused,
    Report,
)
from node_agent.credentials import obtain
from node_agent.host_metrics import merge, scrape_instance
from node_agent.settings import AgentSettings

log = logging.getLogger(__name__)

ENDED_KEPT_S = 300.0
"""How long an ended instance stays in the reports, so the controller sees why."""
_HOST_ONLY = (
    "KSCOPE_HOST_AGENT", "KSCOPE_HOST_MODELS", "KSCOPE_TOKEN_FILE", "KSCOPE_ENROLL_TOKEN",
    "KSCOPE_AGENT_METRICS_PORT", "KSCOPE_AGENT_METRICS_PORT_FILE",
)  # fmt: skip
"""Settings of the host agent that its instances must not inherit."""


class OfferError(ValueError):
    """--models names something that is not a model directory."""


def parse_offers(spec: str) -> dict[str, Path]:
    """The models a host offers, by name: comma-separated NAME=PATH entries, or
    directories whose subdirectories holding a config.json are offered under
    their own names."""
    offers: dict[str, Path] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, path_text = item.partition("=")
        if sep:
            path = Path(path_text).expanduser()
            if not (path / "config.json").is_file():
                raise OfferError(f"--models {item}: {path} holds no config.json")
            offers[name] = path.resolve()
            continue
        folder = Path(item).expanduser()
        if not folder.is_dir():
            raise OfferError(f"--models {item}: no such directory")
        for child in sorted(folder.iterdir()):
            if (child / "config.json").is_file():
                offers.setdefault(child.name, child.resolve())
    return offers


def memory_bytes() -> int:
    """Physical memory (Linux and macOS)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


@dataclass
class _Instance:
    instance_id: str
    model: str
    proc: subprocess.Popen[bytes]
    ended_at: float = 0.0
    detail: str = ""


def instance_argv(load: agent_pb2.LoadModelCommand, path: Path) -> list[str]:
    """The instance agent's command: the catalog's engine and queue settings,
    this host's copy of the weights (kscope_common.cli.agent_argv, as launchers)."""
    return agent_argv(
        AgentCommand(
            engine=load.engine,
            model=load.model,
            model_path=str(path),
            engine_args=tuple(load.engine_args),
            max_concurrency=load.max_concurrency if load.HasField("max_concurrency") else None,
            queue_size=load.queue_size if load.HasField("queue_size") else None,
            queue_timeout_s=load.queue_timeout_s if load.HasField("queue_timeout_s") else None,
            aliases=tuple(load.aliases),
            lora_modules=tuple(load.lora_modules),
        )
    )


def _tied_to_us(argv: list[str]) -> list[str]:
    """On Linux, the kernel stops the instance when the host agent dies
    (setpriv --pdeathsig, util-linux); macOS has no such thing."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *argv] if setpriv else argv


class HostAgent:
    """Loads and unloads model instances on this machine for the controller."""

    def __init__(self, settings: AgentSettings, offers: dict[str, Path]):
        self.settings = settings
        self.offers = offers
        self._token = settings.enroll_token.get_secret_value()
        self._ca_pem = ""
        self._instances: dict[str, _Instance] = {}
        self._stop = asyncio.Event()
        self._stop_reason = ""
        self.link: ControllerLink | None = None

    def _report(self) -> Report:
        hosted = tuple(
            agent_pb2.HostedInstance(
                instance_id=i.instance_id, running=not i.ended_at, detail=i.detail
            )
            for i in self._instances.values()
        )
        running = sum(1 for i in self._instances.values() if not i.ended_at)
        detail = f"{running} instances running; offers {', '.join(sorted(self.offers))}"
        return Report(agent_pb2.AGENT_PHASE_READY, 0, 0, detail, hosted=hosted)

    def _request_stop(self, reason: str) -> None:
        self._stop_reason = self._stop_reason or reason
        self._stop.set()

    def _on_command(self, command: agent_pb2.SessionResponse) -> None:
        kind = command.WhichOneof("command")
        if kind == "load_model":
            self._load(command.load_model)
        elif kind == "unload_model":
            self._unload(command.unload_model.instance_id, "unloaded on request")
        if self.link is not None:
            self.link.report_now.set()

    def _load(self, load: agent_pb2.LoadModelCommand) -> None:
        if load.instance_id in self._instances:
            return  # a repeated command after a reconnect
        path = self.offers.get(load.model)
        if path is None:
            log.error("asked to load %s, which this host does not offer", load.model)
            return
        log_dir = self.settings.host_state_dir.expanduser() / "logs"
        log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        env = {k: v for k, v in os.environ.items() if k not in _HOST_ONLY}
        env |= {
            "KSCOPE_CONTROLLER": self.settings.controller,
            "KSCOPE_INSTANCE_ID": load.instance_id,
        }
        if load.enroll_token:
            # The instance's own one-time token: the host's never leaves this process.
            env |= {"KSCOPE_ENROLL_TOKEN": load.enroll_token, "KSCOPE_TLS_CA": self._ca_pem}
        else:
            env |= {"KSCOPE_INSECURE_PLAINTEXT": "1"}
        if self.settings.metrics_port is not None:
            # Any free port; the host's /metrics reads it from the file and passes it on.
            port_file = self._metrics_port_file(load.instance_id)
            port_file.parent.mkdir(parents=True, exist_ok=True)
            env |= {
                "KSCOPE_AGENT_METRICS_PORT": "0",
                "KSCOPE_AGENT_METRICS_PORT_FILE": str(port_file),
            }
        argv = _tied_to_us(instance_argv(load, path))
        fd = os.open(
            log_dir / f"{load.instance_id}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
        )
        with os.fdopen(fd, "ab") as out:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,  # its own group: unloading signals all of it
            )  # fmt: skip
        log.info("loading %s as instance %s (pid %d)", load.model, load.instance_id, proc.pid)
        self._instances[load.instance_id] = _Instance(load.instance_id, load.model, proc)

    def _metrics_port_file(self, instance_id: str) -> Path:
        return self.settings.host_state_dir.expanduser() / "metrics" / f"{instance_id}.port"

    def _metrics(self) -> Iterable[Metric]:
        """/metrics, on the metrics server's thread."""
        instances = list(self._instances.values())
        running: dict[tuple[str, ...], float] = {(m, "true"): 0 for m in self.offers}
        for inst in instances:
            key = (inst.model, "false" if inst.ended_at else "true")
            running[key] = running.get(key, 0) + 1
        yield gauge("kscope_host_instances", "Instances this host started, by model and"
                    " whether their agent process runs (ended ones are kept a while).",
                    ("model", "running"), running)  # fmt: skip
        yield gauge("kscope_host_offered_models", "Models this host offers from its disk.",
                    ("model",), {(m,): 1 for m in self.offers})  # fmt: skip
        yield from merge(
            family
            for inst in instances
            if not inst.ended_at
            for family in scrape_instance(
                self._metrics_port_file(inst.instance_id), self.settings.host, inst.instance_id
            )
        )

    def _unload(self, instance_id: str, why: str) -> None:
        inst = self._instances.get(instance_id)
        if inst is None or inst.ended_at:
            return
        log.info("unloading instance %s (%s): %s", instance_id, inst.model, why)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(inst.proc.pid, signal.SIGTERM)  # it drains, then exits

    def _watch(self) -> bool:
        """Note instances that exited and forget long-ended ones; True on a change."""
        changed = False
        now = time.monotonic()
        for inst in list(self._instances.values()):
            code = inst.proc.poll()
            if code is not None and not inst.ended_at:
                inst.ended_at = now
                inst.detail = f"instance agent exited with code {code}"
                log.info("instance %s (%s) ended: %s", inst.instance_id, inst.model, inst.detail)
                changed = True
            if inst.ended_at and now - inst.ended_at > ENDED_KEPT_S:
                del self._instances[inst.instance_id]
        return changed

    async def _watch_loop(self) -> None:
        while True:
            if self._watch() and self.link is not None:
                self.link.report_now.set()
            await asyncio.sleep(0.25)

    async def _unload_all(self, grace_s: float) -> None:
        for instance_id in list(self._instances):
            self._unload(instance_id, "the host agent stops")
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(
            i.proc.poll() is None for i in self._instances.values()
        ):
            await asyncio.sleep(0.1)
        for inst in self._instances.values():
            if inst.proc.poll() is None:
                log.warning("instance %s ignored SIGTERM; killing it", inst.instance_id)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(inst.proc.pid, signal.SIGKILL)
                inst.proc.wait()
        self._watch()

    async def run(self) -> int:
        """Serve until SIGTERM; return the process exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._request_stop, f"received {sig.name}")
        host = self.settings.advertise_host or socket.getfqdn()
        try:
            credentials = await obtain(self.settings, self._token)
        except EnrollmentError as exc:
            log.error("%s", exc)
            return 3
        if credentials.certificate is not None:
            self._ca_pem = credentials.certificate.ca_pem.decode()
            credentials.start_renewing()
        self.link = ControllerLink(
            credentials.controller,
            AgentIdentity(
                instance_id="",
                address=f"{host}/pid-{os.getpid()}",  # it serves nothing itself
                models=sorted(self.offers),
                engine="host",
                engine_url="",
                host_agent=True,
                memory_bytes=memory_bytes(),
            ),
            self._report,
            self._request_stop,
            self._on_command,
            orphan_timeout_s=self.settings.agent_orphan_timeout_s,
        )
        log.info("host agent offering %s to %s", ", ".join(sorted(self.offers)) or "nothing",
                 self.settings.controller)  # fmt: skip
        metrics = maybe_serve(self._metrics, self.settings.host, self.settings.metrics_port,
                              self.settings.metrics_port_file)  # fmt: skip
        link_task = asyncio.create_task(self.link.run(), name="controller-link")
        watch_task = asyncio.create_task(self._watch_loop(), name="instance-watch")
        stop_wait = asyncio.create_task(self._stop.wait())
        await asyncio.wait({link_task, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        code = 0
        if link_task.done() and isinstance(link_task.exception(), (RegistrationRefused, Orphaned)):
            log.error("leaving the fleet: %s", link_task.exception())
            code = 3
        log.info("stopping: %s", self._stop_reason or "lost the controller")
        await self._unload_all(self.settings.drain_timeout_s)
        watch_task.cancel()
        stop_wait.cancel()
        self.link.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(link_task, 5)
        if metrics is not None:
            metrics.close()
        await credentials.close()
        log.info("host agent stopped")
        return code
