"""Fixtures shared by all test layers."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import ROOT

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
ARTIFACTS = ROOT / "test-artifacts"


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
    """A tiny random-weight Qwen2-VL for MLX-VLM, built offline (tools/tiny_vlm.py)."""
    out = tmp_path_factory.mktemp("models") / "tiny-vlm"
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "tiny_vlm.py"), str(out)], check=True, timeout=120
    )
    return out


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    if not VLLM_PYTHON.exists():
        pytest.fail(f"vLLM is not installed at {VLLM_PYTHON}: run `make install-vllm`")
    return VLLM_PYTHON


@pytest.fixture
def artifacts(request: pytest.FixtureRequest) -> Iterator[Path]:
    path = ARTIFACTS / request.node.name
    path.mkdir(parents=True, exist_ok=True)
    yield path
