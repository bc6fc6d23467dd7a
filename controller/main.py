"""`kscope-controller`: the control plane process."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pydantic import ValidationError

from controller.ca import CAError
from controller.catalog import CatalogError
from controller.server import start_controller
from controller.settings import ControllerSettings
from kscope_common.daemon import run, wait_for_stop_signal
from kscope_common.logs import configure_logging

log = logging.getLogger("controller")


def parse_settings(argv: list[str] | None = None) -> ControllerSettings:
    """Flags override KSCOPE_* environment variables, which override defaults."""
    parser = argparse.ArgumentParser(prog="kscope-controller", description=__doc__)
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--port-file", type=Path)
    parser.add_argument("--state-dir", type=Path)
    parser.add_argument("--catalog", type=Path)
    parser.add_argument("--mesh-port", type=int, help="the mutual-TLS port (0: any)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    return ControllerSettings(**overrides)


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
