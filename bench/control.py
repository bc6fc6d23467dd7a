"""Control-plane benchmark (`make bench-control`): N agents, one controller.

For each N (100, 1,000 and 10,000 by default) a fresh controller process is
started and measured with:

- N simulated host agents (bench/control_fleet.py, one subprocess): over real
  gRPC, 100 agents per channel, they Register all at once (the burst), keep
  their Session streams and send a load report every second;
- M simulated facades (bench/control_probe.py, in this process) holding
  ControlService.WatchRoutes, the RPC facade/routing.py watches routes with;
- one probe host agent offering the probe models: EnsureModel(probe-i) makes
  the controller launch an instance through its host launcher, the probe host
  starts the instance's simulated agent, which registers and reports READY.

It prints one table, a column per N: the burst's duration and failed attempts,
the controller's CPU per second and memory (from /proc/PID/stat and status),
route propagation (READY written -> every facade's table has it, p50/p99/max),
EnsureModel latency under that load, and the fleet's own CPU (so a saturated
client is visible). See bench/README.md.

The controller runs with KSCOPE_INSECURE_PLAINTEXT=1: the agents share
channels, so the per-agent TLS handshakes of a real fleet cannot be reproduced
and are not measured.

    python bench/control.py                        # N = 100, 1000, 10000
    python bench/control.py --agents 1000 --facades 4
    python bench/control.py --server-option grpc.server.max_pending_requests=20000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import uvloop
from control_fleet import FLEET_MODEL
from control_probe import CALL_TIMEOUT_S, Facades, ProbeHost
from run import (
    CLIENT_CPU,
    GATEWAY_CPU,
    can_pin,
    log_directory,
    log_tail,
    percentile,
    pinned,
    progress,
    raise_nofile_limit,
    spawn,
    stop_process,
)

from kscope.v1 import control_pb2, control_pb2_grpc

BENCH_DIR = Path(__file__).resolve().parent
START_TIMEOUT_S = 30.0
SETTLE_S = 3.0
"""After the burst, before anything is measured: late reports and retries land."""
ADMIT_IN_FLIGHT = 100
"""After a burst that did not finish: the fleet's limit on Register calls in flight."""
ADMITTED_TIMEOUT_S = 45.0
"""How long the agents left over from such a burst get to open their Sessions."""
SAMPLE_TIMEOUT_S = 10.0
"""Longest wait from EnsureModel until an instance of the model is in every
facade's routes (time for the controller to launch another if one fails)."""
PROPAGATION_BUDGET_S = 30.0
"""The samples of one N stop after this long (keeps the run under five minutes)."""
ENSURE_RATE_HZ = 10.0
"""EnsureModel calls per second during the steady window."""
PLAINTEXT_NOTE = (
    "gRPC in plaintext (KSCOPE_INSECURE_PLAINTEXT=1): many simulated agents share a "
    "channel, so per-agent TLS handshakes are not measured"
)
# Enters the controller with extra gRPC server options (--server-option only).
_CONTROLLER_WITH_OPTIONS = (
    "import json, sys\n"
    "from kscope_common import grpc_server\n"
    "grpc_server.SERVER_OPTIONS.extend(tuple(o) for o in json.loads(sys.argv[1]))\n"
    "from controller.main import main\n"
    "main(sys.argv[2:])\n"
)


@dataclass(frozen=True)
class Options:
    """Command-line options of a run."""

    agents: tuple[int, ...]
    """One measurement (and one fresh controller) per N."""
    facades: int
    """Simulated facades watching routes."""
    per_channel: int
    """Simulated agents sharing one channel (one HTTP/2 connection)."""
    samples: int
    """Instances made READY one after the other (route propagation samples)."""
    window_s: float
    """The steady-state window the controller's CPU is measured over."""
    burst_timeout_s: float
    """Give up waiting for every agent's Session after this long."""
    report_interval_s: float | None
    """The controller's report_interval_s (None: its default, 1 s)."""
    server_options: tuple[tuple[str, int | str], ...]
    """Extra gRPC server options for the controller (experiments)."""
    pin: bool
    """Controller on core 0; fleet and this process on core 1."""
    log_dir: Path | None
    json_path: Path | None


@dataclass
class Result:
    """One column of the table."""

    agents: int
    open_sessions: int = 0
    burst_s: float | None = None
    """None: not every Session was open within burst_timeout_s."""
    burst_waited_s: float = 0.0
    burst_open: int = 0
    """Sessions open when the burst ended (all of them, or at its timeout)."""
    admitted_s: float | None = None
    """After a burst that did not finish: how long the rest took with at most
    ADMIT_IN_FLIGHT Register calls in flight (None: not needed, or not done)."""
    register_failures: int = 0
    failure_codes: str = ""
    failure_examples: dict[str, str] = field(default_factory=dict)
    burst_cpu: float = 0.0
    """Controller CPU seconds per wall second during the burst."""
    reports_per_s: float = 0.0
    steady_cpu: float = 0.0
    """Controller CPU seconds per wall second in the steady window."""
    cpu_wait: float = 0.0
    """Share of the steady window the controller's event loop waited for a CPU."""
    rss_mib: float = 0.0
    peak_rss_mib: float = 0.0
    samples_tried: int = 0
    """Cold probe models asked for with EnsureModel."""
    launched: int = 0
    """Instances the controller launched for them (more than one for a model
    when it failed an instance before it was READY and launched another)."""
    propagation_ms: list[float] = field(default_factory=list)
    """Per sample: READY written -> the last facade had it."""
    ensure_to_routed_ms: list[float] = field(default_factory=list)
    """Per sample: EnsureModel sent -> the last facade had the new instance."""
    ensure_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    fleet_cpu: float = 0.0
    """The fleet process's CPU seconds per wall second in the steady window."""
    route_updates: int = 0


# ---------------------------------------------------------------- processes


def proc_cpu_s(pid: int) -> float:
    """utime + stime of one process (all its threads), in seconds."""
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    fields = raw[raw.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_queue_wait_s(pid: int) -> float:
    """How long the process's main thread (the controller's event loop) has waited,
    runnable, for a CPU: other work on its core (/proc/PID/schedstat)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9


def proc_memory_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values.get("VmRSS", 0.0), values.get("VmHWM", 0.0)


def catalog_toml(probe_models: list[str]) -> str:
    entries = [FLEET_MODEL, *probe_models]
    return "".join(
        f'[[models]]\nname = "{name}"\nengine = "mlx_vlm"\nlauncher = "host"\n\n'
        for name in entries
    )


def controller_env(opts: Options) -> dict[str, str]:
    """This environment less KSCOPE_* settings (a developer's must not change what
    is measured), in plaintext mode."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("KSCOPE_")}
    env["KSCOPE_INSECURE_PLAINTEXT"] = "1"
    if opts.report_interval_s is not None:
        env["KSCOPE_REPORT_INTERVAL_S"] = str(opts.report_interval_s)
    return env


async def wait_port(path: Path, proc: subprocess.Popen[bytes], log: Path, what: str) -> int:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log_tail(log)}")
        with contextlib.suppress(OSError, ValueError):
            return int(path.read_text())
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{what} did not start within {START_TIMEOUT_S:.0f} s:\n{log_tail(log)}")


def read_counts(path: Path) -> dict[str, Any]:
    try:
        counts: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return counts


# ---------------------------------------------------------------- one N


async def measure(n: int, opts: Options, log_dir: Path, stack: contextlib.ExitStack) -> Result:
    """Start a controller, a probe and N agents; measure; the caller's stack stops them."""
    result = Result(n)
    probe_models = [f"probe-{i:02d}" for i in range(opts.samples)]
    run_dir = log_dir / f"n{n}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh state and no stale port file
    run_dir.mkdir(parents=True)
    catalog = run_dir / "catalog.toml"
    catalog.write_text(catalog_toml(probe_models))
    port_file = run_dir / "controller.port"
    argv = ["--port", "0", "--port-file", str(port_file), "--state-dir", str(run_dir / "state"),
            "--catalog", str(catalog)]  # fmt: skip
    if opts.server_options:
        argv = [sys.executable, "-c", _CONTROLLER_WITH_OPTIONS,
                json.dumps(opts.server_options), *argv]  # fmt: skip
    else:
        argv = [sys.executable, "-m", "controller.main", *argv]
    ctl_log = run_dir / "controller.log"
    controller = spawn(pinned(argv, GATEWAY_CPU, opts.pin), ctl_log, controller_env(opts))
    stack.callback(stop_process, controller)
    port = await wait_port(port_file, controller, ctl_log, "controller")
    target = f"127.0.0.1:{port}"
    progress(f"N={n:,}: controller pid {controller.pid} on {target}")

    facades = Facades(target, opts.facades)
    probe = ProbeHost(target, probe_models)
    try:
        try:
            await facades.start(START_TIMEOUT_S)
            await probe.start()
        except (TimeoutError, grpc.aio.AioRpcError) as exc:
            raise RuntimeError(f"the facades or the probe host could not attach: {exc!r}\n"
                               f"{log_tail(ctl_log)}") from exc  # fmt: skip
        await burst(n, opts, run_dir, target, controller.pid, result, stack)
        await propagation(probe, facades, probe_models, result)
        await steady(n, run_dir, controller.pid, facades, probe_models, opts, result)
        result.route_updates = facades.updates
        result.errors += probe.failures
    finally:
        await probe.close()
        await facades.close()
    return result


async def burst(
    n: int, opts: Options, run_dir: Path, target: str, controller_pid: int, result: Result,
    stack: contextlib.ExitStack,
) -> None:  # fmt: skip
    """Start N agents at once; wait until every one has its Session open. If they
    are not all in within the burst timeout, limit the Register calls in flight
    (SIGUSR1 to the fleet) and wait again, so the rest is measured with N agents."""
    counts_file = run_dir / "fleet.json"
    argv = [sys.executable, str(BENCH_DIR / "control_fleet.py"), "--target", target,
            "--agents", str(n), "--per-channel", str(opts.per_channel),
            "--admit", str(ADMIT_IN_FLIGHT), "--counts-file", str(counts_file)]  # fmt: skip
    cpu0, t0 = proc_cpu_s(controller_pid), time.monotonic()
    fleet = spawn(pinned(argv, CLIENT_CPU, opts.pin), run_dir / "fleet.log")
    stack.callback(stop_process, fleet)
    counts = await wait_all_open(fleet, n, counts_file, t0, opts.burst_timeout_s, run_dir)
    waited = time.monotonic() - t0
    result.burst_cpu = (proc_cpu_s(controller_pid) - cpu0) / waited
    result.burst_waited_s = waited
    result.burst_s = counts.get("burst_s") or None
    result.burst_open = result.open_sessions = counts.get("opened", 0)
    result.register_failures = counts.get("register_retries", 0)
    result.failure_codes = counts.get("retry_codes", "")
    result.failure_examples = counts.get("retry_examples", {})
    done = f"in {result.burst_s:.1f} s" if result.burst_s else f"NOT all after {waited:.0f} s"
    failed = f"{result.register_failures:,} failed Register attempts"
    codes = result.failure_codes or "none"
    progress(f"  burst: {result.open_sessions:,} of {n:,} sessions open {done}; {failed}"
             f" ({codes}); controller CPU {result.burst_cpu:.2f}")  # fmt: skip
    if result.burst_s is None:
        progress(f"  at most {ADMIT_IN_FLIGHT} Register calls in flight from now on")
        fleet.send_signal(signal.SIGUSR1)
        t1 = time.monotonic()
        counts = await wait_all_open(fleet, n, counts_file, t1, ADMITTED_TIMEOUT_S, run_dir)
        result.open_sessions = counts.get("opened", 0)
        if counts.get("burst_s"):
            result.admitted_s = time.monotonic() - t1
        progress(f"  then: {result.open_sessions:,} of {n:,} sessions open after"
                 f" {time.monotonic() - t1:.1f} s")  # fmt: skip
    await asyncio.sleep(SETTLE_S)


async def wait_all_open(
    fleet: subprocess.Popen[bytes], n: int, counts_file: Path, t0: float, timeout_s: float,
    run_dir: Path,
) -> dict[str, Any]:  # fmt: skip
    """The fleet's counts once every Session is open, or when `timeout_s` is up."""
    counts: dict[str, Any] = {}
    last_print = t0
    while time.monotonic() - t0 < timeout_s:
        if fleet.poll() is not None:
            raise RuntimeError(f"the fleet exited with {fleet.returncode}:\n"
                               f"{log_tail(run_dir / 'fleet.log')}")  # fmt: skip
        counts = read_counts(counts_file)
        if counts.get("burst_s"):
            break
        if time.monotonic() - last_print >= 10:
            last_print = time.monotonic()
            progress(f"  {last_print - t0:5.0f} s: {counts.get('opened', 0):,} of {n:,} sessions"
                     f" open, {counts.get('register_retries', 0):,} failed Register attempts"
                     f" ({counts.get('retry_codes') or 'none'})")  # fmt: skip
        await asyncio.sleep(0.1)
    return counts


async def propagation(
    probe: ProbeHost, facades: Facades, models: list[str], result: Result
) -> None:
    """One instance at a time: EnsureModel(cold model) -> launch on the probe host ->
    its agent reports READY -> every facade's routes have it."""
    control = facades.control
    deadline = time.monotonic() + PROPAGATION_BUDGET_S
    for model in models:
        if time.monotonic() > deadline:
            result.errors.append(f"propagation: only {len(result.propagation_ms)} samples"
                                 f" within {PROPAGATION_BUDGET_S:.0f} s")  # fmt: skip
            break
        result.samples_tried += 1
        sent = time.monotonic()
        try:
            await control.EnsureModel(
                control_pb2.EnsureModelRequest(model=model), timeout=CALL_TIMEOUT_S
            )
            result.ensure_ms.append((time.monotonic() - sent) * 1000)
        except grpc.aio.AioRpcError as exc:
            result.errors.append(f"EnsureModel({model}): {exc.code().name}")
            continue
        wait_s = max(1.0, min(SAMPLE_TIMEOUT_S, deadline - time.monotonic()))
        try:
            routed = await facades.first_routed(model, wait_s)
        except TimeoutError:
            launched = probe.launched.get(model, [])
            if not launched:
                result.errors.append(f"{model}: no instance launched on the probe host"
                                     f" within {wait_s:.0f} s")  # fmt: skip
                continue
            state = await instance_state(control, model, launched[-1])
            late = f"not in every facade's routes within {wait_s:.0f} s"
            result.errors.append(f"{launched[-1]}: {late}; the controller says {state}")
            continue
        finally:
            result.launched += len(probe.launched.get(model, []))
        instance_id, seen = routed.instance_id, routed.at
        ready = probe.ready_at.get(instance_id, seen)
        result.propagation_ms.append((seen - ready) * 1000)
        result.ensure_to_routed_ms.append((seen - sent) * 1000)
    progress(f"  propagation p50 {percentile(result.propagation_ms, 50):.1f} ms,"
             f" p99 {percentile(result.propagation_ms, 99):.1f} ms"
             f" ({len(result.propagation_ms)} instances, {facades.count} facades)")  # fmt: skip


async def instance_state(
    control: control_pb2_grpc.ControlServiceAsyncStub, model: str, instance_id: str
) -> str:
    """The instance's state and reason, as ListInstances tells them."""
    try:
        reply = await control.ListInstances(
            control_pb2.ListInstancesRequest(model=model, include_ended=True),
            timeout=CALL_TIMEOUT_S,
        )
    except grpc.aio.AioRpcError as exc:
        return f"nothing (ListInstances: {exc.code().name})"
    for inst in reply.instances:
        if inst.id == instance_id:
            return f"{control_pb2.InstanceState.Name(inst.state)}: {inst.reason}"
    return "it does not know it"


async def steady(
    n: int, run_dir: Path, controller_pid: int, facades: Facades, models: list[str],
    opts: Options, result: Result,
) -> None:  # fmt: skip
    """The steady window: N agents reporting, EnsureModel at ENSURE_RATE_HZ on
    models that are READY (what a facade does for a model it routes)."""
    counts_file = run_dir / "fleet.json"
    c0, cpu0, t0 = read_counts(counts_file), proc_cpu_s(controller_pid), time.monotonic()
    wait0 = run_queue_wait_s(controller_pid)
    control = facades.control
    calls = 0
    while time.monotonic() - t0 < opts.window_s:
        model = models[calls % len(models)]
        calls += 1
        sent = time.monotonic()
        try:
            await control.EnsureModel(
                control_pb2.EnsureModelRequest(model=model), timeout=CALL_TIMEOUT_S
            )
            result.ensure_ms.append((time.monotonic() - sent) * 1000)
        except grpc.aio.AioRpcError as exc:
            result.errors.append(f"EnsureModel({model}): {exc.code().name}")
        await asyncio.sleep(max(0.0, t0 + calls / ENSURE_RATE_HZ - time.monotonic()))
    c1, cpu1, t1 = read_counts(counts_file), proc_cpu_s(controller_pid), time.monotonic()
    result.steady_cpu = (cpu1 - cpu0) / (t1 - t0)
    result.cpu_wait = (run_queue_wait_s(controller_pid) - wait0) / (t1 - t0)
    span = c1.get("t", 0.0) - c0.get("t", 0.0)
    if span > 0:
        result.reports_per_s = (c1["reports"] - c0["reports"]) / span
        result.fleet_cpu = (c1["cpu_s"] - c0["cpu_s"]) / span
    result.open_sessions = c1.get("opened", result.open_sessions)
    result.rss_mib, result.peak_rss_mib = proc_memory_mib(controller_pid)
    progress(f"  steady: {result.reports_per_s:,.0f} reports/s, controller CPU"
             f" {result.steady_cpu:.3f} of a core, RSS {result.rss_mib:.0f} MiB;"
             f" EnsureModel p50 {percentile(result.ensure_ms, 50):.2f} ms")  # fmt: skip


# ---------------------------------------------------------------- report


def _num(value: float | None, digits: int = 1) -> str:
    if value is None or value != value:
        return "-"
    return f"{value:,.{digits}f}"


def table_rows(results: list[Result]) -> list[tuple[str, list[str]]]:
    def pcts(values: list[float], digits: int = 1) -> list[str]:
        return [" / ".join(_num(percentile(v, q), digits) for q in (50, 99)) for v in [values]]

    rows: list[tuple[str, list[str]]] = [
        ("Sessions open / N", [f"{r.open_sessions:,} / {r.agents:,}" for r in results]),
        ("burst: all Sessions open (s)",
         [_num(r.burst_s) if r.burst_s else f"> {r.burst_waited_s:.0f} ({r.burst_open:,} open)"
          for r in results]),
        (f"  then, <= {ADMIT_IN_FLIGHT} Registers in flight (s)",
         [_num(r.admitted_s) if r.admitted_s else "-" if r.burst_s else "not all"
          for r in results]),
        ("burst: agents registered per s",
         [_num(r.agents / r.burst_s, 0) if r.burst_s else "-" for r in results]),
        ("burst: failed Register attempts", [f"{r.register_failures:,}" for r in results]),
        ("burst: controller CPU (cores)", [_num(r.burst_cpu, 2) for r in results]),
        ("steady: reports/s sent", [_num(r.reports_per_s, 0) for r in results]),
        ("steady: controller CPU (cores)", [_num(r.steady_cpu, 3) for r in results]),
        ("steady: controller waited for a CPU",
         [f"{r.cpu_wait:.0%}" for r in results]),
        ("steady: controller µs per report",
         [_num(r.steady_cpu / r.reports_per_s * 1e6, 0) if r.reports_per_s else "-"
          for r in results]),
        ("controller RSS / peak (MiB)",
         [f"{r.rss_mib:,.0f} / {r.peak_rss_mib:,.0f}" for r in results]),
        ("route propagation p50 / p99 (ms)",
         [pcts(r.propagation_ms)[0] for r in results]),
        ("route propagation max (ms)",
         [_num(max(r.propagation_ms, default=None)) for r in results]),
        ("  models routed / asked (instances launched)",
         [f"{len(r.propagation_ms)} / {r.samples_tried} ({r.launched})" for r in results]),
        ("EnsureModel -> routed p50 / p99 (ms)",
         [pcts(r.ensure_to_routed_ms)[0] for r in results]),
        ("EnsureModel p50 / p99 (ms)", [pcts(r.ensure_ms, 2)[0] for r in results]),
        ("fleet process CPU (cores)", [_num(r.fleet_cpu, 2) for r in results]),
    ]  # fmt: skip
    return rows


def render(results: list[Result], opts: Options) -> str:
    rows = table_rows(results)
    width = max(len(name) for name, _ in rows)
    cols = [max(len(f"N={r.agents:,}"), *(len(row[1][i]) for row in rows))
            for i, r in enumerate(results)]  # fmt: skip
    header = f"{'':<{width}}  " + "  ".join(
        f"{f'N={r.agents:,}':>{c}}" for r, c in zip(results, cols, strict=True)
    )
    lines = [header, "-" * len(header)]
    for name, values in rows:
        lines.append(f"{name:<{width}}  " + "  ".join(
            f"{v:>{c}}" for v, c in zip(values, cols, strict=True)))  # fmt: skip
    lines.append("")
    lines.append(f"{opts.facades} facades watching routes; {opts.samples} probe models asked for"
                 f" one at a time per N; {opts.per_channel} agents per channel;")  # fmt: skip
    lines.append(f"{PLAINTEXT_NOTE}.")
    for r in results:
        if r.failure_codes:
            examples = "; ".join(f"{k}: {v!r}" for k, v in r.failure_examples.items())
            lines.append(f"N={r.agents:,}: failed Register attempts by code: {r.failure_codes}"
                         f" ({examples})")  # fmt: skip
        for error in r.errors[:3]:
            lines.append(f"N={r.agents:,}: error: {error}")
        if len(r.errors) > 3:
            lines.append(f"N={r.agents:,}: ... {len(r.errors) - 3} more errors (--json has all)")
    lines.append(goal_line(results))
    return "\n".join(lines)


def goal_line(results: list[Result]) -> str:
    big = [r for r in results if r.agents >= 10_000]
    if not big:
        return "goal (10,000 agents on one controller core, propagation p99 <= 100 ms): not run"
    r = big[-1]
    p99 = percentile(r.propagation_ms, 99)
    all_open = r.open_sessions >= r.agents
    all_ready = len(r.propagation_ms) == r.samples_tried > 0
    met = all_open and all_ready and r.steady_cpu < 1.0 and p99 <= 100.0
    burst = "yes" if r.burst_s else f"no, {r.burst_open:,} in {r.burst_waited_s:.0f} s"
    return (
        f"goal (N={r.agents:,} on one controller core, propagation p99 <= 100 ms): "
        f"{'MET' if met else 'NOT MET'} (all Sessions open: {'yes' if all_open else 'no'};"
        f" steady CPU {r.steady_cpu:.2f} of a core, {r.cpu_wait:.0%} waiting for one;"
        f" p99 {_num(p99)} ms over {len(r.propagation_ms)} of {r.samples_tried} instances);"
        f" the burst alone got all in: {burst}"
    )


def dump(path: Path, results: list[Result], opts: Options) -> None:
    doc = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(opts).items()},
        "note": PLAINTEXT_NOTE,
        "results": [vars(r) for r in results],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))


# ---------------------------------------------------------------- main


async def run_all(opts: Options, log_dir: Path) -> list[Result]:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    loop.add_signal_handler(signal.SIGTERM, task.cancel)  # so the finally blocks run
    results = []
    for n in opts.agents:
        with contextlib.ExitStack() as stack:  # stops the fleet, then the controller
            results.append(await measure(n, opts, log_dir, stack))
    return results


def server_option(text: str) -> tuple[str, int | str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, int(value) if value.lstrip("-").isdigit() else value


def agent_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(x.replace("_", "")) for x in text.split(",") if x.strip())
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected numbers such as 100,1000, got {text!r}")
    return counts


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        description="KScope control-plane benchmark: N simulated agents, M facades, one controller."
    )
    p.add_argument(
        "--agents",
        type=agent_counts,
        default=(100, 1000, 10000),
        help="comma-separated N, one fresh controller each (default 100,1000,10000)",
    )
    p.add_argument("--facades", type=int, default=10, help="simulated facades watching routes")
    p.add_argument("--per-channel", type=int, default=100, help="agents sharing one channel")
    p.add_argument("--samples", type=int, default=30, help="instances made READY per N")
    p.add_argument("--window", type=float, default=10.0, help="steady window, seconds")
    p.add_argument(
        "--burst-timeout",
        type=float,
        default=60.0,
        help="stop waiting for the burst after this many seconds",
    )
    p.add_argument(
        "--report-interval-s",
        type=float,
        help="the controller's report_interval_s (default: its own, 1 s)",
    )
    p.add_argument(
        "--server-option",
        type=server_option,
        action="append",
        default=[],
        help="extra gRPC server option for the controller, KEY=VALUE (repeatable)",
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    p.add_argument("--log-dir", type=Path, help="keep the processes' logs here")
    p.add_argument("--json", type=Path, dest="json_path", help="also write the results as JSON")
    a = p.parse_args(argv)
    return Options(
        agents=a.agents, facades=a.facades, per_channel=a.per_channel, samples=a.samples,
        window_s=a.window, burst_timeout_s=a.burst_timeout,
        report_interval_s=a.report_interval_s, server_options=tuple(a.server_option),
        pin=not a.no_pin and can_pin(), log_dir=a.log_dir, json_path=a.json_path,
    )  # fmt: skip


@contextlib.contextmanager
def pinned_here(pin: bool) -> Iterator[None]:
    """The probe (this process) shares the client core with the fleet."""
    if pin:
        os.sched_setaffinity(0, {CLIENT_CPU})
    yield


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    raise_nofile_limit()
    started = time.monotonic()
    try:
        with pinned_here(opts.pin), log_directory(opts.log_dir) as log_dir:
            results = uvloop.run(run_all(opts, log_dir))
    except RuntimeError as exc:  # a process that would not start; all stopped
        progress(f"bench-control: {exc}")
        return 2
    except (asyncio.CancelledError, KeyboardInterrupt):  # SIGTERM / Ctrl-C; all stopped
        progress("bench-control: interrupted")
        return 130
    print(render(results, opts))
    print(f"(took {time.monotonic() - started:.0f} s)")
    if opts.json_path is not None:
        dump(opts.json_path, results, opts)
    for r in results:
        if r.errors or r.open_sessions < r.agents:
            # A measurement, not a test: what it reached is the result (exit 0).
            print(f"note: N={r.agents}: {r.open_sessions} sessions open at the end; "
                  f"{len(r.errors)} errors; see docs/performance.md")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
