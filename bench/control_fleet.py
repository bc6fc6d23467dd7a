"""N simulated host agents over real gRPC, for `make bench-control` (bench/control.py).

Each simulated agent does what node_agent/controller_link.py does: Register
(5 s deadline, retried with the agents' own backoff), open the Session stream,
say hello, then send a load report every `report_interval_ms` the controller
asked for, and register again when its Session breaks. They are cheap: one
asyncio task each; `--per-channel` agents (100) share a link: a grpc.aio
channel (its own connection) for Register, whose status codes it reports, and
one HTTP/2 connection for their Session streams, spoken by control_h2.py: the
same gRPC on the wire, but a report is a pre-built frame and the reports due
in a tick leave in one write (through grpc.aio a report costs the client
~100 µs of CPU, and one core could not send 10,000 a second).

Run by bench/control.py as a subprocess on the client core; once a second it
prints its counts (and its own CPU) as one JSON line on stdout and to
--counts-file; it stops on SIGTERM. SIGUSR1 limits the Register calls in
flight to --admit (100) from then on.

    python bench/control_fleet.py --target 127.0.0.1:50051 --agents 1000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import uvloop
from control_h2 import Connection, Stream, grpc_message

from kscope.v1 import agent_pb2, agent_pb2_grpc
from kscope_common.grpc_server import CHANNEL_OPTIONS
from kscope_common.retry import RECONNECT, Backoff

REGISTER_TIMEOUT_S = 5.0
"""As the real agent (node_agent/controller_link.py)."""
FLEET_MODEL = "fleet"
"""The model every simulated host agent offers (nobody asks for it)."""


def channel_options(index: int) -> list[tuple[str, int]]:
    """The agents' channel options, plus a local subchannel pool: grpc shares one
    connection between channels with the same target and arguments, and here each
    channel must be its own connection, as each host's is in a real fleet."""
    return [
        *CHANNEL_OPTIONS,
        ("grpc.use_local_subchannel_pool", 1),
        ("kscope.bench.channel", index),
    ]


@dataclass
class Counts:
    """What the fleet did so far (printed as JSON once a second)."""

    agents: int = 0
    registered: int = 0
    """Register calls that succeeded (each agent once)."""
    opened: int = 0
    """Sessions open now: the controller's first command (the revoked list) arrived."""
    register_retries: int = 0
    """Register attempts that failed and were retried."""
    retry_codes: str = ""
    """The status codes of the failed attempts, e.g. "DEADLINE_EXCEEDED:12"."""
    retry_examples: dict[str, str] = field(default_factory=dict)
    """The first message seen with each of those codes."""
    session_errors: int = 0
    """Sessions that broke while the fleet ran (the agent registers again)."""
    reports: int = 0
    """Load reports written."""
    admitted_at: float = 0.0
    """When SIGUSR1 limited the Register calls in flight (0: never)."""
    blocked_reports: int = 0
    """Reports not sent because HTTP/2 flow control had no window for them."""
    burst_s: float = 0.0
    """From the start to the moment every agent had its Session open (0 until then)."""
    cpu_s: float = 0.0
    """This process's CPU time so far."""
    t: float = 0.0
    """time.monotonic() of this line (CLOCK_MONOTONIC: comparable across processes)."""


SESSION_PATH = "/kscope.v1.AgentService/Session"
TICKS_PER_INTERVAL = 10
"""Each link sends the reports due in a tenth of the report interval in one write."""


class Link:
    """What `per_channel` simulated agents share: a grpc.aio channel for their
    Register calls and one HTTP/2 connection (control_h2.py) for their Sessions."""

    def __init__(self, target: str, index: int, counts: Counts, report: bytes):
        self._channel = grpc.aio.insecure_channel(target, options=channel_options(index))
        self.stub = agent_pb2_grpc.AgentServiceStub(self._channel)
        self._host, _, port = target.rpartition(":")
        self._port = int(port)
        self._conn: Connection | None = None
        self._connecting = asyncio.Lock()
        self._counts = counts
        self._report = report
        self._buckets: list[dict[int, Stream]] = [{} for _ in range(TICKS_PER_INTERVAL)]
        self.interval_s = 1.0
        self.blocked_before = 0
        """Frames that closed connections did not send for want of window."""

    async def connection(self) -> Connection:
        async with self._connecting:
            if self._conn is None or self._conn.closed:
                if self._conn is not None:
                    self.blocked_before += self._conn.blocked
                self._conn = await Connection.open(self._host, self._port)
            return self._conn

    @property
    def blocked(self) -> int:
        return self.blocked_before + (self._conn.blocked if self._conn is not None else 0)

    def add(self, stream: Stream) -> None:
        # Real agents report at their own phase, not in lock-step.
        self._buckets[random.randrange(TICKS_PER_INTERVAL)][stream.id] = stream

    def remove(self, stream: Stream) -> None:
        for bucket in self._buckets:
            bucket.pop(stream.id, None)

    async def send_reports(self) -> None:
        """Every tick, the reports of one bucket of agents, in one write."""
        tick, next_at = 0, time.monotonic()
        while True:
            next_at += self.interval_s / TICKS_PER_INTERVAL
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            conn = self._conn
            bucket = self._buckets[tick % TICKS_PER_INTERVAL]
            tick += 1
            if conn is None or conn.closed or not bucket:
                continue
            frames = [conn.data_frame(stream, self._report) for stream in bucket.values()]
            conn.write(b"".join(frames))
            self._counts.reports += sum(1 for f in frames if f)

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        await self._channel.close(None)


class Fleet:
    def __init__(self, target: str, agents: int, per_channel: int, rate: float = 0.0):
        self.counts = Counts(agents=agents)
        self._rate = rate
        self._admission: asyncio.Semaphore | None = None
        self._codes: dict[str, int] = {}
        self._stop = asyncio.Event()
        # What a host agent with nothing loaded reports: the same every time.
        report = agent_pb2.SessionRequest(
            load_report=agent_pb2.LoadReport(
                phase=agent_pb2.AGENT_PHASE_READY,
                detail=f"0 instances running; offers {FLEET_MODEL}",
            )
        )
        self._links = [
            Link(target, i, self.counts, grpc_message(report.SerializeToString()))
            for i in range(max(1, -(-agents // per_channel)))
        ]
        self._per_channel = per_channel
        self._started = 0.0
        self._ever_registered = [False] * agents

    async def run(self) -> None:
        self._started = time.monotonic()
        tasks = [asyncio.create_task(link.send_reports()) for link in self._links]
        try:
            for i in range(self.counts.agents):  # all at once (the burst) unless paced
                tasks.append(asyncio.create_task(self._agent(i)))
                if self._rate:
                    await asyncio.sleep(
                        max(0.0, self._started + (i + 1) / self._rate - time.monotonic())
                    )
            await self._stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for link in self._links:
                await link.close()

    def stop(self) -> None:
        self._stop.set()

    def admit(self, in_flight: int) -> None:
        """From now on at most `in_flight` Register calls at once (the rest wait
        their turn): the shape of a client-side admission limit."""
        self._admission = asyncio.Semaphore(in_flight)
        self.counts.admitted_at = time.monotonic()

    def snapshot(self) -> Counts:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.counts.cpu_s = usage.ru_utime + usage.ru_stime
        self.counts.t = time.monotonic()
        self.counts.retry_codes = ",".join(f"{k}:{v}" for k, v in sorted(self._codes.items()))
        self.counts.blocked_reports = sum(link.blocked for link in self._links)
        return self.counts

    async def _register(
        self, stub: agent_pb2_grpc.AgentServiceAsyncStub, index: int
    ) -> agent_pb2.RegisterResponse:
        request = agent_pb2.RegisterRequest(
            address=f"sim-host-{index}.bench:1",
            hostname=f"sim-host-{index}",
            models=[FLEET_MODEL],
            engine="mlx_vlm",
            pid=os.getpid(),
            host_agent=True,
            memory_bytes=64 << 30,
        )
        backoff = Backoff(RECONNECT)
        while True:
            try:
                if self._admission is None:
                    return await stub.Register(request, timeout=REGISTER_TIMEOUT_S)
                async with self._admission:
                    return await stub.Register(request, timeout=REGISTER_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                self.counts.register_retries += 1
                name = exc.code().name
                self._codes[name] = self._codes.get(name, 0) + 1
                self.counts.retry_examples.setdefault(name, exc.details() or "")
                await asyncio.sleep(backoff.next_delay())

    async def _agent(self, index: int) -> None:
        """Register, hold the Session; after a broken Session, register again (as
        node_agent/controller_link.py does). Its reports go out with its link's."""
        link = self._links[index // self._per_channel]
        backoff = Backoff(RECONNECT)
        loop = asyncio.get_running_loop()
        while True:
            reply = await self._register(link.stub, index)
            if not self._ever_registered[index]:
                self._ever_registered[index] = True
                self.counts.registered += 1
            link.interval_s = max(0.05, reply.report_interval_ms / 1000)
            hello = agent_pb2.SessionRequest(hello=agent_pb2.SessionHello(agent_id=reply.agent_id))
            ended: asyncio.Future[str] = loop.create_future()

            def on_end(_stream: Stream, why: str, ended: asyncio.Future[str] = ended) -> None:
                if not ended.done():
                    ended.set_result(why)

            try:
                conn = await link.connection()
                stream = conn.start(SESSION_PATH, hello.SerializeToString(), on_end)
                await stream.opened  # the revoked list: the controller opened the session
            except (ConnectionError, OSError):
                self.counts.session_errors += 1
                await asyncio.sleep(backoff.next_delay())
                continue
            self.counts.opened += 1
            if self.counts.opened == self.counts.agents and not self.counts.burst_s:
                self.counts.burst_s = time.monotonic() - self._started
            link.add(stream)
            try:
                await ended
            finally:
                link.remove(stream)
                self.counts.opened -= 1
            self.counts.session_errors += 1
            await asyncio.sleep(backoff.next_delay())


async def main_async(args: argparse.Namespace) -> None:
    fleet = Fleet(args.target, args.agents, args.per_channel, args.rate)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, fleet.stop)
    loop.add_signal_handler(signal.SIGUSR1, fleet.admit, args.admit)

    def publish() -> None:
        line = json.dumps(asdict(fleet.snapshot()))
        print(line, flush=True)
        if args.counts_file is not None:  # atomically: the orchestrator never reads half
            tmp = args.counts_file.with_name(args.counts_file.name + ".tmp")
            tmp.write_text(line)
            os.replace(tmp, args.counts_file)

    async def print_counts() -> None:
        while True:
            publish()
            await asyncio.sleep(args.print_interval)

    printer = asyncio.create_task(print_counts())
    try:
        await fleet.run()
    finally:
        printer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await printer
        publish()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Simulated KScope host agents (bench/control.py).")
    p.add_argument("--target", required=True, help="the controller's host:port (plaintext)")
    p.add_argument("--agents", type=int, required=True)
    p.add_argument("--per-channel", type=int, default=100, help="agents sharing one channel")
    p.add_argument("--print-interval", type=float, default=1.0)
    p.add_argument(
        "--admit",
        type=int,
        default=100,
        help="after SIGUSR1, at most this many Register calls in flight at once",
    )
    p.add_argument("--counts-file", type=Path, help="also write the latest counts here")
    p.add_argument(
        "--rate", type=float, default=0.0, help="agents started per second (0: all at once)"
    )
    args = p.parse_args(argv)
    uvloop.run(main_async(args))


if __name__ == "__main__":
    main()
