"""Fixtures shared by all test layers, and `require`: how a test says which
real component it needs (see tests/README.md)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import ROOT

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
ARTIFACTS = ROOT / "test-artifacts"
SLAPD_HOW = "install Debian's slapd and ldap-utils (`make system-deps`)"
CHROMIUM_HOW = "install Debian's chromium (`make system-deps`) and playwright (`make install`)"


def in_ci() -> bool:
    """CI=true: every real component must be there, so nothing may be skipped."""
    return os.environ.get("CI", "").strip().lower() == "true"


def require(component: str, available: bool, how_to_install: str) -> None:
    """Go on when `component` (slapd, chromium, the vLLM venv, MLX, SLURM …) is
    available. Otherwise skip the test, saying why and how to get it (`-ra`
    lists it in the summary); under CI=true fail it instead, so a run that
    lacks a real component never passes by skipping what needs it."""
    if available:
        return
    message = f"{component} is missing: {how_to_install}"
    if in_ci():
        pytest.fail(f"{message} (CI=true: a missing component fails the run)", pytrace=False)
    pytest.skip(message)


def mlx_available() -> bool:
    """MLX-VLM importable by the agent (the `mlx` extra): mlx's library loads and
    mlx_vlm is installed. Checked in a child, so this process never loads MLX."""
    if importlib.util.find_spec("mlx_vlm") is None:
        return False
    probe = subprocess.run(
        [sys.executable, "-c", "import mlx.core"], capture_output=True, timeout=60, check=False
    )
    return probe.returncode == 0


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Qwen2 model built offline (tools/tiny_model.py)."""
    out = tmp_path_factory.mktemp("models") / "tiny-qwen2"
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "tiny_model.py"), str(out)], check=True, timeout=120
    )
    return out


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Qwen2-VL for MLX-VLM, built offline (tools/tiny_vlm.py).
    Every MLX test uses it, so it is where MLX is required."""
    require("MLX-VLM", mlx_available(), "install the mlx extra: pip install -e '.[mlx]'")
    out = tmp_path_factory.mktemp("models") / "tiny-vlm"
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "tiny_vlm.py"), str(out)], check=True, timeout=120
    )
    return out


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """The Python of the vLLM CPU build: KSCOPE_VLLM_PYTHON, else .venv-vllm's."""
    given = os.environ.get("KSCOPE_VLLM_PYTHON", "").strip()
    python = Path(given) if given else VLLM_PYTHON
    require(
        f"vLLM ({python})", python.exists(),
        "run `make install-vllm`, or set KSCOPE_VLLM_PYTHON to a Python that has vllm",
    )  # fmt: skip
    return python


@pytest.fixture
def artifacts(request: pytest.FixtureRequest) -> Iterator[Path]:
    path = ARTIFACTS / request.node.name
    path.mkdir(parents=True, exist_ok=True)
    yield path
