"""`kscope-controller`: the control plane process."""

from __future__ import annotations

import logging

from pydantic import ValidationError

from controller.ca import CAError
from controller.catalog import CatalogError
from controller.server import start_controller
from controller.settings import ControllerSettings
from kscope_common.cli import CommandLine
from kscope_common.daemon import run, wait_for_stop_signal
from kscope_common.logs import configure_logging

log = logging.getLogger("controller")


COMMAND_LINE = CommandLine(
    "kscope-controller",
    ControllerSettings,
    description=__doc__ or "",
    docs_defaults={"agent_python": "the Python running the controller"},
)
"""One flag per ControllerSettings field (kscope_common/cli.py)."""


def parse_settings(argv: list[str] | None = None) -> ControllerSettings:
    """Flags override KSCOPE_* environment variables, which override defaults."""
    return COMMAND_LINE.parse(argv)


async def serve(settings: ControllerSettings) -> None:
    controller = await start_controller(settings)
    sig = await wait_for_stop_signal()
    log.info("received %s; stopping", sig.name)
    await controller.stop()


def main(argv: list[str] | None = None) -> None:
    configure_logging("controller")
    try:
        settings = parse_settings(argv)
        run(serve(settings))
    except (CatalogError, ValidationError, CAError) as exc:
        raise SystemExit(f"kscope-controller: {exc}") from None


if __name__ == "__main__":
    main()
