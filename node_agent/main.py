"""`kscope-agent`: one node agent (started by a launcher, or by hand), or with
--host-agent a machine's host agent; `kscope-agent install-launchd` and
`uninstall-launchd` manage the macOS LaunchAgent that runs a host agent."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pydantic import SecretStr, ValidationError

from kscope_common.daemon import run
from kscope_common.handoff import reexec_without, take_handed_over
from kscope_common.logs import configure_logging
from node_agent import launchd
from node_agent.credentials import SECRET_ENVIRONMENT
from node_agent.daemon import Agent
from node_agent.engines.factory import UnknownEngine
from node_agent.host import HostAgent, OfferError, parse_offers
from node_agent.launchd import LaunchdError, read_token_file
from node_agent.settings import AgentSettings

log = logging.getLogger("node_agent")


def parse_settings(argv: list[str] | None = None) -> AgentSettings:
    """Flags override KSCOPE_* environment variables. The enrollment token and
    instance id come from the environment only (KSCOPE_ENROLL_TOKEN,
    KSCOPE_INSTANCE_ID) or the token file, never from flags that `ps` would show."""
    parser = argparse.ArgumentParser(prog="kscope-agent", description=__doc__)
    parser.add_argument("--controller", help="controller host:port")
    parser.add_argument("--engine", "--model-type", dest="engine", help="vllm, openai or mlx_vlm")
    parser.add_argument("--model", help="model name clients use")
    parser.add_argument("--model-path")
    parser.add_argument("--upstream-url")
    parser.add_argument("--upstream-model")
    parser.add_argument("--engine-args-json", dest="engine_args")
    parser.add_argument("--host", help="address to bind; @node: this machine's own address")
    parser.add_argument("--ca", dest="tls_ca", help="the cluster CA certificate (file or PEM)")
    parser.add_argument(
        "--insecure-plaintext", action="store_const", const=True,
        help="debugging only: no TLS (the controller must run the same way)",
    )  # fmt: skip
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
    parser.add_argument(
        "--host-agent",
        action="store_const",
        const=True,
        help="no instance of its own: load the models it offers on request",
    )
    parser.add_argument(
        "--models",
        dest="host_models",
        help="host agent: NAME=PATH entries or model directories, comma-separated",
    )
    parser.add_argument(
        "--token-file", type=Path, help="read the enrollment token from this private file"
    )
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    settings = AgentSettings(**overrides)
    if settings.token_file is not None:
        token = read_token_file(settings.token_file.expanduser())
        settings = settings.model_copy(update={"enroll_token": SecretStr(token)})
    return settings


async def serve(settings: AgentSettings) -> None:
    if settings.host_agent:
        code = await HostAgent(settings, parse_offers(settings.host_models)).run()
    else:
        code = await Agent(settings).run()
    if code:
        raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("install-launchd", "uninstall-launchd"):
        sys.exit(launchd.main(args))
    if argv is None:
        reexec_without(SECRET_ENVIRONMENT)
        take_handed_over()
    configure_logging("agent")
    try:
        settings = parse_settings(args)
        if settings.host_agent:
            parse_offers(settings.host_models)  # a bad --models fails now, not on load
        run(serve(settings))
    except (ValidationError, UnknownEngine, LaunchdError, OfferError) as exc:
        sys.exit(f"kscope-agent: {exc}")


if __name__ == "__main__":
    main()
