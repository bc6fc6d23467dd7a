"""The ~3,000-stream "ceiling" on a bare grpc.aio server, reproduced in seconds.

A bare grpc.aio server (generic handlers, no KScope code) offers a unary
Register and a bidirectional Session; the client starts `--calls` simulated
agents at once, each calling Register and then opening a Session that it holds.
With grpc core's defaults a few thousand calls complete and every other one
ends CANCELLED, without a message and without the server application ever
seeing it: calls that arrive while more than `grpc.server.max_pending_requests`
(1,000) calls wait for the application to accept them are refused at random,
and all of them past `grpc.server.max_pending_requests_hard_limit` (3,000). A
grpc.aio server accepts one call at a time from its event loop, so a burst
fills that queue. Raise the two limits (`--server-option KEY=VALUE`) and the
same burst completes. See docs/performance.md, "Control plane".

    python bench/control_bare.py --calls 8000
    python bench/control_bare.py --calls 8000 \\
        --server-option grpc.server.max_pending_requests=20000 \\
        --server-option grpc.server.max_pending_requests_hard_limit=20000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import uvloop
from run import log_tail, progress, raise_nofile_limit, spawn, stop_process

SERVICE = "bench.Bare"
OPEN_TIMEOUT_S = 30.0


def _same(data: bytes) -> bytes:
    return data


async def serve(port_file: Path, options: list[tuple[str, int | str]]) -> None:
    async def register(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return b"agent"

    async def session(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        async for _ in requests:
            yield b"open"  # one answer per message: the first one says "open"

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Register": grpc.unary_unary_rpc_method_handler(register, _same, _same),
            "Session": grpc.stream_stream_rpc_method_handler(session, _same, _same),
        },
    )
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    port_file.write_text(str(port))
    await server.wait_for_termination()


Examples = dict[str, str]
"""The first error message seen for each outcome."""


def _failed(
    outcome: Counter[str], examples: Examples, what: str, exc: grpc.aio.AioRpcError
) -> None:
    key = f"{what} {exc.code().name}"
    outcome[key] += 1
    examples.setdefault(key, exc.details() or "")


async def agent(
    channel: grpc.aio.Channel, outcome: Counter[str], examples: Examples
) -> grpc.aio.StreamStreamCall[bytes, bytes] | None:
    try:
        await channel.unary_unary(f"/{SERVICE}/Register", _same, _same)(b"hi", timeout=60)
    except grpc.aio.AioRpcError as exc:
        _failed(outcome, examples, "Register", exc)
        return None
    # No request iterator: the reader/writer style (grpc-stubs does not know it).
    call = channel.stream_stream(f"/{SERVICE}/Session", _same, _same)()  # type: ignore[call-arg]
    try:
        await call.write(b"hello")
        await asyncio.wait_for(call.read(), OPEN_TIMEOUT_S)
    except grpc.aio.AioRpcError as exc:
        _failed(outcome, examples, "Session", exc)
        return None
    except TimeoutError:
        outcome["Session not open"] += 1
        call.cancel()
        return None
    outcome["Session open"] += 1
    return call


async def burst(port: int, calls: int, connections: int) -> tuple[Counter[str], Examples]:
    channels = [
        grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        for _ in range(connections)
    ]
    outcome: Counter[str] = Counter()
    examples: Examples = {}
    started = time.monotonic()
    held = await asyncio.gather(
        *(agent(channels[i % connections], outcome, examples) for i in range(calls))
    )
    outcome["seconds"] = round(time.monotonic() - started)
    for call in held:
        if call is not None:
            call.cancel()
    for channel in channels:
        await channel.close(None)
    return outcome, examples


def server_option(text: str) -> tuple[str, int | str]:
    key, _, value = text.partition("=")
    return key, int(value) if value.lstrip("-").isdigit() else value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="A burst of agents against a bare grpc.aio server.")
    p.add_argument("--calls", type=int, default=8000, help="agents started at once")
    p.add_argument("--connections", type=int, default=80, help="client connections")
    p.add_argument("--server-option", type=server_option, action="append", default=[])
    p.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # the server subprocess
    a = p.parse_args(argv)
    raise_nofile_limit()
    if a.serve is not None:
        uvloop.run(serve(a.serve, a.server_option))
        return 0
    with tempfile.TemporaryDirectory(prefix="kscope-bare-") as tmp:
        port_file, log = Path(tmp) / "port", Path(tmp) / "server.log"
        argv_server = [sys.executable, __file__, "--serve", str(port_file)]
        for key, value in a.server_option:
            argv_server += ["--server-option", f"{key}={value}"]
        server = spawn(argv_server, log)
        try:
            deadline = time.monotonic() + 20
            while not port_file.exists() and server.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if not port_file.exists():
                progress(f"control_bare: the server did not start:\n{log_tail(log)}")
                return 2
            outcome, examples = uvloop.run(
                burst(int(port_file.read_text()), a.calls, a.connections)
            )
        finally:
            with contextlib.suppress(Exception):
                stop_process(server)
    print(json.dumps({"calls": a.calls, "server_options": dict(a.server_option), **outcome}))
    for key, details in examples.items():
        print(f"  {key}: {details!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
