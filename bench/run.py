"""Measure what KScope's token path costs: direct vs gateway, side by side.

"direct" is client → bench upstream; "gateway" is client → KScope facade →
agent → the same kind of upstream, with the gRPC plane on mutual TLS (the
default); "plaintext" is the same gateway started with --insecure-plaintext.
All run in one go and one table shows the columns and the ratios gateway /
direct and gateway / plaintext (what TLS costs). See bench/README.md.

    python bench/run.py                      # starts upstreams and both gateways itself
    python bench/run.py --no-plaintext       # no plaintext gateway
    python bench/run.py --direct-only        # no gateway
    python bench/run.py --gateway-url http://127.0.0.1:8000 --model bench
    python bench/run.py --only e,f --paced-rounds 1   # a subset of the scenarios

Pinning (when the machine has two or more cores): the client and the upstreams
run on core 1, the gateway (facade and agent together) on core 0. Only one
gateway runs at a time: per upstream, direct is measured first, then the TLS
gateway is started, measured and stopped, then the plaintext one.

For the paced scenarios (d, e, f) the CPU a started gateway used (its process
and all its descendants: the controller and facade in the serve process, and
the agent) is read from /proc around the measured run and reported per chunk
the client received and as a share of the gateway's core.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import uvloop
from loadclient import Endpoint, Load, Pool, Samples, TransportError, get_json, run_load

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_GATEWAY_CMD = (
    "kscope serve --engine openai --upstream-url {upstream_url} --model {model}"
    " --host 127.0.0.1 --port {port} --controller-port 0 --state-dir {state_dir}"
    " --no-require-key"
)
PLAINTEXT_FLAG = "--insecure-plaintext"
PLAINTEXT_ENV = "KSCOPE_INSECURE_PLAINTEXT"
"""Also turns TLS off; removed from the gateways' environment so only the flag decides."""
GATEWAY_CPU = 0
CLIENT_CPU = 1
UPSTREAM_START_TIMEOUT_S = 20.0
STOP_GRACE_S = 5.0
CHAT_PATH = "/v1/chat/completions"
Stop = Callable[[], None]
Metrics = dict[str, float]
DIRECT, GATEWAY, PLAINTEXT = "direct", "gateway", "plaintext"
"""The sides a scenario is measured on."""
SCENARIO_KEYS = ("a", "b", "c", "d", "e", "f")
WIDE_PACED_STREAMS = {"e": 160, "f": 320}
"""Concurrent paced streams of scenarios e and f (the issue's one-core target: 320 at
>= 0.97x direct, i.e. at most half a core, <= 33 µs of CPU per chunk, at 160)."""
NOFILE_WANTED = 65536
"""Open files wanted by the client and (inherited) the upstreams and gateways."""
CPU_US_PER_CHUNK = "KScope CPU µs/chunk"
CORE_SHARE = "KScope core share"


@dataclass(frozen=True)
class Options:
    """Command-line options of a run."""

    direct_only: bool
    """Measure only client → upstream."""
    plaintext: bool
    """Also measure a started gateway with PLAINTEXT_FLAG appended (gRPC without TLS)."""
    gateway_cmd: str
    """Gateway command; {upstream_url}, {model}, {port} and {state_dir} are filled in."""
    gateway_url: str | None
    """An already-running gateway (in front of a fast upstream) instead of starting one."""
    paced_gateway_url: str | None
    """An already-running gateway in front of a paced upstream, for scenario d."""
    model: str
    """Model name sent in requests and expected in the gateway's /v1/models."""
    api_key: str
    """Bearer token sent to both sides (empty: none)."""
    requests: int
    """Requests in scenario a (concurrency 1)."""
    duration_s: float
    """Length of scenarios b and c."""
    concurrency: int
    """Concurrency of scenarios b, c and d."""
    paced_rounds: int
    """Streams each worker runs in scenarios d, e and f."""
    only: tuple[str, ...] | None
    """The scenarios to run (None: all)."""
    gateway_timeout_s: float
    """How long a started gateway may take to list the model as ready."""
    json_path: Path | None
    """Where to dump the results as JSON."""
    log_dir: Path | None
    """Where the subprocesses' logs go (default: a temporary directory)."""
    pin: bool
    """Pin processes to cores (decided before the client pins itself)."""


# ---------------------------------------------------------------- processes


def can_pin() -> bool:
    """Pin only where cores 0 and 1 both exist and taskset is there to do it."""
    cpus = os.sched_getaffinity(0)
    return {GATEWAY_CPU, CLIENT_CPU} <= cpus and shutil.which("taskset") is not None


def pinned(argv: list[str], cpu: int, pin: bool) -> list[str]:
    return ["taskset", "-c", str(cpu), *argv] if pin else argv


def spawn(
    argv: list[str], log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a process in its own session, so stopping it reaches all its children."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after a grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(STOP_GRACE_S)
            break
        except subprocess.TimeoutExpired:
            continue
    # The leader may be gone while children linger; make sure the group is.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def raise_nofile_limit(wanted: int = NOFILE_WANTED) -> None:
    """Raise the soft limit on open files (inherited by the processes started here) so
    hundreds of concurrent streams fit on both ends; never above the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def tree_cpu_s(root: int) -> float | None:
    """CPU seconds (user + system) used so far by process `root` and all its descendants,
    from /proc; None where there is no /proc or `root` is gone.

    Each process counts its own time plus that of the children it has reaped
    (utime + stime + cutime + cstime), so a descendant that exits between two
    readings is still counted once: first in its own fields, then in its parent's.
    """
    stats: dict[int, tuple[int, int]] = {}  # pid -> (ppid, clock ticks)
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                raw = f.read()
        except OSError:  # gone meanwhile
            continue
        # The command name (field 2) is in parentheses and may hold spaces.
        fields = raw[raw.rindex(b")") + 2 :].split()
        # fields[1] is ppid (field 4); fields[11:15] utime, stime, cutime, cstime (14-17).
        stats[int(name)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
    if root not in stats:
        return None
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    ticks, todo = 0, [root]
    while todo:
        pid = todo.pop()
        ticks += stats[pid][1]
        todo += children.get(pid, [])
    return ticks / os.sysconf("SC_CLK_TCK")


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def wait_for(
    ready: Callable[[], Awaitable[bool]],
    proc: subprocess.Popen[bytes],
    timeout_s: float,
    what: str,
    log: Path,
) -> None:
    """Poll the async predicate `ready` until it is true, the process exits, or time is up."""
    deadline = time.monotonic() + timeout_s
    last_error = "not ready"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log_tail(log)}")
        try:
            if await ready():
                return
        except (TransportError, OSError, TimeoutError, ValueError) as exc:
            last_error = str(exc)
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{what} not ready after {timeout_s:.0f} s ({last_error}):\n{log_tail(log)}")


async def start_upstream(
    log_dir: Path, name: str, pacing: list[str], pin: bool
) -> tuple[str, Stop]:
    """Start a bench upstream on the client's core; return its base URL and a stop."""
    port_file = log_dir / f"{name}.port"
    log = log_dir / f"{name}.log"
    argv = [sys.executable, str(BENCH_DIR / "upstream.py"), "--port-file", str(port_file)]
    proc = spawn(pinned([*argv, *pacing], CLIENT_CPU, pin), log)
    try:

        async def healthy() -> bool:
            if not port_file.exists():
                return False
            port = int(port_file.read_text())
            pool = Pool(Endpoint("127.0.0.1", port, ""))
            try:
                await get_json(pool, "/health")
            finally:
                pool.close()
            return True

        await wait_for(healthy, proc, UPSTREAM_START_TIMEOUT_S, f"upstream {name}", log)
    except BaseException:
        stop_process(proc)
        raise
    return f"http://127.0.0.1:{int(port_file.read_text())}", lambda: stop_process(proc)


def gateway_argv(
    template: str, upstream_url: str, model: str, port: int, state_dir: Path
) -> list[str]:
    argv = shlex.split(
        template.format(upstream_url=upstream_url, model=model, port=port, state_dir=state_dir)
    )
    # Prefer the console script next to this interpreter (the project's venv).
    local = Path(sys.executable).parent / argv[0]
    if "/" not in argv[0] and local.exists():
        argv[0] = str(local)
    return argv


def model_ready(doc: object, model: str) -> bool:
    """True when /v1/models lists `model` with state "ready"."""
    data = doc.get("data") if isinstance(doc, dict) else None
    return isinstance(data, list) and any(
        isinstance(m, dict) and m.get("id") == model and m.get("state") == "ready" for m in data
    )


async def start_gateway(
    cmd: str, upstream_url: str, opts: Options, log_dir: Path, name: str
) -> tuple[str, int, Stop]:
    """Start gateway `cmd` on its own core in front of `upstream_url` (which ends in /v1);
    return its base URL, its pid (taskset execs the command, so the pid is the gateway's)
    and a stop."""
    port = free_port()
    log = log_dir / f"{name}.log"
    argv = gateway_argv(cmd, upstream_url, opts.model, port, log_dir / f"{name}-state")
    env = {k: v for k, v in os.environ.items() if k != PLAINTEXT_ENV}
    progress(f"starting {name}: {shlex.join(argv)}")
    proc = spawn(pinned(argv, GATEWAY_CPU, opts.pin), log, env)
    base_url = f"http://127.0.0.1:{port}"
    pool = Pool(Endpoint.from_url(base_url))

    async def ready() -> bool:
        return model_ready(await get_json(pool, "/v1/models", opts.api_key), opts.model)

    try:
        await wait_for(ready, proc, opts.gateway_timeout_s, f"gateway {name}", log)
    except BaseException:
        stop_process(proc)
        raise
    finally:
        pool.close()
    return base_url, proc.pid, lambda: stop_process(proc)


@dataclass(frozen=True)
class Target:
    """What one side of a scenario is measured against."""

    base_url: str
    pid: int | None = None
    """A gateway started here: its CPU (and its descendants') is measured; None otherwise."""


@contextlib.asynccontextmanager
async def started_gateway(
    cmd: str, upstream_url: str, opts: Options, log_dir: Path, name: str
) -> AsyncIterator[Target]:
    """Yield gateway `cmd` started in front of `upstream_url`; stop it after."""
    base_url, pid, stop = await start_gateway(cmd, upstream_url + "/v1", opts, log_dir, name)
    try:
        yield Target(base_url, pid)
    finally:
        stop()


GatewaySide = tuple[str, contextlib.AbstractAsyncContextManager[Target]]
"""A gateway side's name and what yields its Target (starting and stopping it if need be)."""


def gateways_in_front_of(
    upstream_url: str, given_url: str | None, opts: Options, log_dir: Path, group: str
) -> list[GatewaySide]:
    """The gateway sides to measure in front of `upstream_url`, in order; each is entered
    only while it is measured, so no two started gateways run at once."""
    if opts.direct_only:
        return []
    if given_url is not None:
        url = given_url.rstrip("/").removesuffix("/v1")
        return [(GATEWAY, contextlib.nullcontext(Target(url)))]
    if opts.gateway_url is not None:
        return []  # an external gateway sits in front of the fast upstream only
    cmds = {GATEWAY: opts.gateway_cmd}
    if opts.plaintext:
        cmds[PLAINTEXT] = f"{opts.gateway_cmd} {PLAINTEXT_FLAG}"
    return [
        (side, started_gateway(cmd, upstream_url, opts, log_dir, f"{side}-{group}"))
        for side, cmd in cmds.items()
    ]


# ---------------------------------------------------------------- scenarios


def chat_body(model: str, max_tokens: int, stream: bool) -> bytes:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "Benchmark request: say something."}],
        "max_tokens": max_tokens,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return orjson.dumps(body)


def ms(seconds: float) -> float:
    return seconds * 1000.0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def latency_metrics(s: Samples) -> Metrics:
    return {"p50 ms": ms(percentile(s.latencies, 50)), "p99 ms": ms(percentile(s.latencies, 99))}


def throughput_metrics(s: Samples) -> Metrics:
    return {"req/s": len(s.latencies) / s.elapsed, **latency_metrics(s)}


def stream_metrics(s: Samples) -> Metrics:
    return {
        "chunks/s": s.events / s.elapsed,
        "TTFT p50 ms": ms(percentile(s.ttfts, 50)),
        "TTFT p99 ms": ms(percentile(s.ttfts, 99)),
        "gap p50 ms": ms(percentile(s.gaps, 50)),
        "gap p99 ms": ms(percentile(s.gaps, 99)),
    }


def paced_metrics(s: Samples) -> Metrics:
    return {
        "mean stream ms": ms(mean(s.latencies)),
        "mean TTFT ms": ms(mean(s.ttfts)),
        "req/s": len(s.latencies) / s.elapsed,
    }


def kscope_cpu_metrics(cpu_s: float, wall_s: float, chunks: int) -> Metrics:
    """What the gateway's processes used: CPU per chunk the client received, and the
    share of (the gateway's) one core: CPU seconds / wall seconds."""
    return {
        CPU_US_PER_CHUNK: cpu_s * 1e6 / chunks if chunks else float("nan"),
        CORE_SHARE: cpu_s / wall_s if wall_s > 0 else float("nan"),
    }


@dataclass(frozen=True)
class Scenario:
    """One measurement, run once against each side."""

    key: str
    title: str
    paced: bool
    """Run against the paced upstream (and a gateway in front of it)."""
    body: bytes
    load: Load
    """The measured load; `request` is filled in per side."""
    warmup: Load
    metrics: Callable[[Samples], Metrics]
    kscope_cpu: bool = False
    """Also report the CPU a started gateway used (CPU_US_PER_CHUNK, CORE_SHARE)."""


def scenarios(opts: Options) -> list[Scenario]:
    """All scenarios, or those in `opts.only`."""
    c, big, rounds = opts.concurrency, 10**9, opts.paced_rounds
    short, stream64 = chat_body(opts.model, 16, False), chat_body(opts.model, 64, True)
    # fmt: off
    every = [
        Scenario(
            "a", "chat, c=1", False, short,
            Load(b"", 1, opts.requests, 120.0, False),
            Load(b"", 1, 100, 2.0, False),
            latency_metrics,
        ),
        Scenario(
            "b", f"chat, c={c}, {opts.duration_s:g} s", False, short,
            Load(b"", c, big, opts.duration_s, False),
            Load(b"", c, big, 0.5, False),
            throughput_metrics,
        ),
        Scenario(
            "c", f"stream x64, c={c}, {opts.duration_s:g} s", False, stream64,
            Load(b"", c, big, opts.duration_s, True, 64),
            Load(b"", c, big, 0.5, True, 64),
            stream_metrics,
        ),
        Scenario(
            "d", f"paced stream x64, c={c} x{rounds}", True, stream64,
            Load(b"", c, c * rounds, 120.0, True, 64),
            Load(b"", c, c, 10.0, True, 64),
            paced_metrics, kscope_cpu=True,
        ),
        *(
            Scenario(
                key, f"paced stream x64, c={n} x{rounds}", True, stream64,
                Load(b"", n, n * rounds, 120.0, True, 64),
                Load(b"", n, n, 20.0, True, 64),  # one round: opens the n connections
                paced_metrics, kscope_cpu=True,
            )
            for key, n in WIDE_PACED_STREAMS.items()
        ),
    ]
    # fmt: on
    return [sc for sc in every if opts.only is None or sc.key in opts.only]


@dataclass
class Outcome:
    """A scenario's metrics on each side."""

    scenario: Scenario
    sides: dict[str, Metrics] = field(default_factory=dict)
    """Metrics per measured side (DIRECT, GATEWAY, PLAINTEXT)."""
    errors: dict[str, list[str]] = field(default_factory=dict)
    client_cpu: dict[str, float] = field(default_factory=dict)
    """Share of a core the client used, per side."""


def with_request(load: Load, endpoint: Endpoint, body: bytes, api_key: str) -> Load:
    request = endpoint.request("POST", CHAT_PATH, body, api_key)
    return Load(
        request, load.concurrency, load.max_requests, load.duration_s, load.stream, load.min_events
    )


async def measure(out: Outcome, side: str, target: Target, api_key: str) -> None:
    """Run `out`'s scenario (warm-up, then measured) against `target`; record it as `side`."""
    sc = out.scenario
    progress(f"  {sc.key}) {sc.title}: {side} ...")
    pool = Pool(Endpoint.from_url(target.base_url))
    watch = target.pid if sc.kscope_cpu else None
    try:
        await run_load(pool, with_request(sc.warmup, pool.endpoint, sc.body, api_key))
        cpu0 = tree_cpu_s(watch) if watch is not None else None
        wall0 = time.perf_counter()
        samples = await run_load(pool, with_request(sc.load, pool.endpoint, sc.body, api_key))
        wall = time.perf_counter() - wall0
        cpu1 = tree_cpu_s(watch) if watch is not None else None
    finally:
        pool.close()
    metrics = sc.metrics(samples) if samples.latencies else {}
    out.client_cpu[side] = samples.client_cpu_s / samples.elapsed
    line = (
        f"     {len(samples.latencies)} replies in {samples.elapsed:.2f} s,"
        f" client CPU {out.client_cpu[side]:.0%} of a core"
    )
    if cpu0 is not None and cpu1 is not None:
        metrics |= kscope_cpu_metrics(cpu1 - cpu0, wall, samples.events)
        line += (
            f", KScope CPU {metrics[CORE_SHARE]:.0%} of a core,"
            f" {fmt(metrics[CPU_US_PER_CHUNK])} µs/chunk"
        )
    progress(line)
    if samples.errors:
        metrics["errors"] = float(samples.errors)
        out.errors[side] = samples.error_examples
        progress(f"     {samples.errors} errors, e.g. {samples.error_examples[0]}")
    out.sides[side] = metrics


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- report


def fmt(value: float | None) -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3f}"


def ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def minus(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def rows(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    """One row per metric: scenario, metric, direct, gateway, ratio (gateway / direct),
    plaintext and tls_plain (gateway / plaintext); None where a side was not measured."""
    table: list[dict[str, Any]] = []
    for out in outcomes:
        d_m, g_m, p_m = (out.sides.get(side, {}) for side in (DIRECT, GATEWAY, PLAINTEXT))
        for name in dict.fromkeys([*d_m, *g_m, *p_m]):
            d, g, p = d_m.get(name), g_m.get(name), p_m.get(name)
            counts = name == "errors"
            table.append(
                {"scenario": out.scenario.key, "title": out.scenario.title, "metric": name,
                 "direct": d, "gateway": g, "ratio": None if counts else ratio(g, d),
                 "plaintext": p, "tls_plain": None if counts else ratio(g, p)}
            )  # fmt: skip
        if out.scenario.key == "a" and (g_m or p_m):
            d50 = d_m.get("p50 ms")
            table.append(
                {"scenario": "a", "title": out.scenario.title, "metric": "added p50 ms",
                 "direct": None, "gateway": minus(g_m.get("p50 ms"), d50), "ratio": None,
                 "plaintext": minus(p_m.get("p50 ms"), d50), "tls_plain": None}
            )  # fmt: skip
    return table


def fmt_ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "-"


def render(table: list[dict[str, Any]]) -> str:
    header = (
        f"{'scenario':<34} {'metric':<20} {'direct':>10} {'gateway':>10} {'gw/direct':>9}"
        f" {'plaintext':>10} {'tls/plain':>9}"
    )
    lines = [header, "-" * len(header)]
    last = ""
    for r in table:
        label = f"{r['scenario']}) {r['title']}" if r["scenario"] != last else ""
        last = r["scenario"]
        lines.append(
            f"{label:<34} {r['metric']:<20} {fmt(r['direct']):>10} {fmt(r['gateway']):>10}"
            f" {fmt_ratio(r['ratio']):>9} {fmt(r['plaintext']):>10}"
            f" {fmt_ratio(r['tls_plain']):>9}"
        )
    return "\n".join(lines)


def dump(path: Path, opts: Options, table: list[dict[str, Any]], outcomes: list[Outcome]) -> None:
    doc = {
        "meta": {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "python": platform.python_version(),
            "client_cpus": sorted(os.sched_getaffinity(0)),
            "options": {
                k: "***" if k == "api_key" and v else str(v) if isinstance(v, Path) else v
                for k, v in vars(opts).items()
            },
        },
        "rows": table,
        "errors": {o.scenario.key: o.errors for o in outcomes if o.errors},
        "client_cpu": {o.scenario.key: o.client_cpu for o in outcomes},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))


# ---------------------------------------------------------------- main


async def run_group(
    group: list[Scenario], direct_url: str, gateways: list[GatewaySide], api_key: str
) -> list[Outcome]:
    """Measure every scenario of `group` direct, then on each gateway side in turn; a
    gateway side is started (if it is started at all) only while its turn lasts."""
    outcomes = [Outcome(sc) for sc in group]
    for out in outcomes:
        await measure(out, DIRECT, Target(direct_url), api_key)
    for side, gateway in gateways:
        async with gateway as target:
            for out in outcomes:
                await measure(out, side, target, api_key)
    return outcomes


async def run_all(opts: Options, log_dir: Path) -> list[Outcome]:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    loop.add_signal_handler(signal.SIGTERM, task.cancel)  # so the finally blocks run
    all_scenarios = scenarios(opts)
    outcomes: list[Outcome] = []
    with contextlib.ExitStack() as stack:
        for paced, given in ((False, opts.gateway_url), (True, opts.paced_gateway_url)):
            group = [sc for sc in all_scenarios if sc.paced == paced]
            if not group:
                continue
            name = "paced" if paced else "fast"
            pacing = ["--first-token-delay-ms", "50", "--token-interval-ms", "10"] if paced else []
            progress(f"starting {name} upstream")
            upstream_url, stop = await start_upstream(log_dir, f"upstream-{name}", pacing, opts.pin)
            stack.callback(stop)
            gateways = gateways_in_front_of(upstream_url, given, opts, log_dir, name)
            outcomes += await run_group(group, upstream_url, gateways, opts.api_key)
    return outcomes


def pin_client(opts: Options) -> None:
    if opts.pin:
        os.sched_setaffinity(0, {CLIENT_CPU})


def scenario_keys(text: str) -> tuple[str, ...]:
    """Parse --only: comma-separated scenario keys, e.g. "e,f"."""
    keys = tuple(k.strip().lower() for k in text.split(",") if k.strip())
    unknown = [k for k in keys if k not in SCENARIO_KEYS]
    if not keys or unknown:
        raise argparse.ArgumentTypeError(
            f"expected some of {','.join(SCENARIO_KEYS)}, got {text!r}"
        )
    return keys


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        description="KScope token-path benchmark: direct vs gateway (TLS) vs gateway (plaintext)."
    )
    p.add_argument("--direct-only", action="store_true", help="measure only client → upstream")
    p.add_argument(
        "--no-plaintext",
        action="store_true",
        help=f"do not also measure a gateway started with {PLAINTEXT_FLAG}",
    )
    p.add_argument(
        "--gateway-cmd",
        default=DEFAULT_GATEWAY_CMD,
        help="gateway command; {upstream_url}, {model}, {port}, {state_dir} are filled in"
        f" (the plaintext side appends {PLAINTEXT_FLAG})",
    )
    p.add_argument("--gateway-url", help="benchmark this running gateway instead of starting one")
    p.add_argument("--paced-gateway-url", help="running gateway in front of a paced upstream")
    p.add_argument("--model", default="bench")
    p.add_argument("--api-key", default="")
    p.add_argument("--requests", type=int, default=1000, help="requests in scenario a")
    p.add_argument("--duration", type=float, default=5.0, help="seconds of scenarios b and c")
    p.add_argument("--concurrency", type=int, default=32, help="of scenarios b, c and d")
    p.add_argument(
        "--paced-rounds", type=int, default=3, help="streams per worker in scenarios d, e, f"
    )
    p.add_argument(
        "--only",
        type=scenario_keys,
        help=f"comma-separated scenarios to run (of {','.join(SCENARIO_KEYS)}; default all)",
    )
    p.add_argument("--gateway-timeout", type=float, default=120.0)
    p.add_argument("--json", type=Path, dest="json_path")
    p.add_argument("--log-dir", type=Path)
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    a = p.parse_args(argv)
    return Options(
        direct_only=a.direct_only, plaintext=not a.no_plaintext, gateway_cmd=a.gateway_cmd,
        gateway_url=a.gateway_url, paced_gateway_url=a.paced_gateway_url, model=a.model,
        api_key=a.api_key, requests=a.requests, duration_s=a.duration,
        concurrency=a.concurrency, paced_rounds=a.paced_rounds, only=a.only,
        gateway_timeout_s=a.gateway_timeout, json_path=a.json_path, log_dir=a.log_dir,
        pin=not a.no_pin and can_pin(),
    )  # fmt: skip


@contextlib.contextmanager
def log_directory(given: Path | None) -> Iterator[Path]:
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="kscope-bench-") as tmp:
        yield Path(tmp)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    pin_client(opts)
    raise_nofile_limit()
    try:
        with log_directory(opts.log_dir) as log_dir:
            outcomes = uvloop.run(run_all(opts, log_dir))
    except RuntimeError as exc:  # a process that would not start; already stopped
        progress(f"bench: {exc}")
        return 2
    except (asyncio.CancelledError, KeyboardInterrupt):  # SIGTERM / Ctrl-C; all stopped
        progress("bench: interrupted")
        return 130
    table = rows(outcomes)
    print(render(table))
    if opts.json_path is not None:
        dump(opts.json_path, opts, table, outcomes)
    return 1 if any(o.errors for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
