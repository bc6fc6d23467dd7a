"""`kscope-agent`: one node agent (started by a launcher, or by hand), or with
--host-agent a machine's host agent; `kscope-agent install-launchd` and
`uninstall-launchd` manage the macOS LaunchAgent that runs a host agent."""

from __future__ import annotations

import logging
import sys

from pydantic import SecretStr, ValidationError

from kscope_common.cli import CommandLine
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


COMMAND_LINE = CommandLine(
    "kscope-agent",
    AgentSettings,
    description=__doc__ or "",
    aliases={
        "--model-type": "engine",
        "--engine-args-json": "engine_args",
        "--queue-timeout": "queue_timeout_s",
        "--models": "host_models",
        "--ca": "tls_ca",
        "--registration-token": "enroll_token",  # refused, as every secret is
    },
    file_flags={"enroll_token": "--token-file"},
    docs_defaults={
        "vllm_python": ".venv-vllm/bin/python beside KScope when it exists, "
        "else the Python running the agent"
    },
)
"""One flag per AgentSettings field, the older names kept (kscope_common/cli.py)."""


def parse_settings(argv: list[str] | None = None) -> AgentSettings:
    """Flags override KSCOPE_* environment variables. The enrollment token comes
    from the environment (KSCOPE_ENROLL_TOKEN) or the token file only, never
    from a flag that `ps` would show."""
    settings = COMMAND_LINE.parse(argv)
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


def main(argv: list[str] | None = None, hand_off: bool | None = None) -> None:
    """`hand_off` (default: when argv is this process's own) first moves the
    secrets out of the environment the kernel shows (kscope_common/handoff.py)."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("install-launchd", "uninstall-launchd"):
        sys.exit(launchd.main(args))
    if hand_off is None:
        hand_off = argv is None
    if hand_off:
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
