"""The malloc arena cap every daemon applies at start."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kscope_common.memory import limit_malloc_arenas
from tests.procs import ROOT


def test_an_operators_malloc_arena_max_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    assert limit_malloc_arenas() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_cap_applies_on_glibc() -> None:
    # In a fresh interpreter: the cap is for the whole process.
    code = "from kscope_common.memory import limit_malloc_arenas as f; print(f())"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=30, check=True)  # fmt: skip
    assert out.stdout.strip() == "True"
