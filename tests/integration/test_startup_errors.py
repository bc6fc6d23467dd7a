"""Bad settings fail at start with a message that names the setting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize(
    ("module", "args", "env", "named"),
    [
        ("controller.main", [], {"KSCOPE_PORT": "abc"}, "port"),
        ("controller.main", ["--catalog", "/nonexistent.toml"], {}, "/nonexistent.toml"),
        ("controller.main", [], {"KSCOPE_RECONCILE_INTERVAL_S": "-1"}, "reconcile_interval_s"),
        ("facade.main", [], {"KSCOPE_MAX_BODY_BYTES": "0"}, "max_body_bytes"),
        ("node_agent.main", ["--engine", "vllm"], {}, "--model-path"),
        ("node_agent.main", ["--engine", "nope"], {}, "unknown engine"),
    ],
)
def test_bad_setting_is_named(
    tmp_path: Path, module: str, args: list[str], env: dict[str, str], named: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        env={**os.environ, "KSCOPE_STATE_DIR": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert named in result.stderr
    assert "Traceback" not in result.stderr
