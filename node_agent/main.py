"""`kscope-agent`: one node agent (started by a launcher, or by hand)."""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError

from kscope_common.daemon import run
from kscope_common.logs import configure_logging
from node_agent.daemon import Agent
from node_agent.engines.factory import UnknownEngine
from node_agent.settings import AgentSettings

log = logging.getLogger("node_agent")


def parse_settings(argv: list[str] | None = None) -> AgentSettings:
    """Flags override KSCOPE_* environment variables. The registration token and
    instance id come from the environment only (KSCOPE_REGISTRATION_TOKEN,
    KSCOPE_INSTANCE_ID), never from flags that `ps` would show."""
    parser = argparse.ArgumentParser(prog="kscope-agent", description=__doc__)
    parser.add_argument("--controller", help="controller host:port")
    parser.add_argument("--engine", "--model-type", dest="engine", help="vllm, openai or mlx_vlm")
    parser.add_argument("--model", help="model name clients use")
    parser.add_argument("--model-path")
    parser.add_argument("--upstream-url")
    parser.add_argument("--upstream-model")
    parser.add_argument("--engine-args-json", dest="engine_args")
    parser.add_argument("--host")
    parser.add_argument("--advertise-host")
    parser.add_argument("--port", type=int)
    parser.add_argument(
        "--max-concurrency", type=int, help="requests the engine works on at once (0: no limit)"
    )
    parser.add_argument("--queue-size", type=int, help="requests that may wait for the engine")
    parser.add_argument(
        "--queue-timeout",
        dest="queue_timeout_s",
        type=float,
        help="seconds a request may wait in the queue",
    )
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    return AgentSettings(**overrides)


async def serve(settings: AgentSettings) -> None:
    code = await Agent(settings).run()
    if code:
        raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    configure_logging("agent")
    try:
        settings = parse_settings(argv)
        run(serve(settings))
    except (ValidationError, UnknownEngine) as exc:
        sys.exit(f"kscope-agent: {exc}")


if __name__ == "__main__":
    main()
