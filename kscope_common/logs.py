"""Logging set-up for entry points (libraries only call logging.getLogger)."""

from __future__ import annotations

import logging
import os


def configure_logging(component: str) -> None:
    level = os.environ.get("KSCOPE_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)s {component} %(name)s: %(message)s",
    )
