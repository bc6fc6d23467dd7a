"""The node agent's command line is built in one place
(kscope_common.cli.agent_argv): a launcher and a host agent start the same
command for the same model settings, and the agent parses it back into them."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

from controller.catalog import EngineKind, ModelSpec
from controller.launchers.base import LaunchSpec, agent_invocation
from kscope.v1 import agent_pb2
from kscope_common.cli import AgentCommand, agent_argv
from node_agent.host import instance_argv
from node_agent.main import parse_settings


@pytest.fixture(autouse=True)
def no_agent_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("KSCOPE_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize(
    "queue",
    [
        {},
        {"max_concurrency": 2, "queue_size": 0, "queue_timeout_s": 12.5},
        {"max_concurrency": 0},
    ],
)
def test_launcher_and_host_agent_start_the_same_command(queue: dict[str, Any]) -> None:
    model = ModelSpec(
        name="qwen", engine=EngineKind.MLX_VLM, model_path="/disk/qwen",
        engine_args=("--max-tokens", "64"), **queue,
    )  # fmt: skip
    launched = agent_invocation(LaunchSpec("i-1", model, "ctl:1", "token"), sys.executable)
    load = agent_pb2.LoadModelCommand(
        instance_id="i-1", model="qwen", engine="mlx_vlm", engine_args=["--max-tokens", "64"],
        **queue,
    )  # fmt: skip
    assert instance_argv(load, Path("/disk/qwen")) == launched.argv
    assert "token" not in launched.argv  # secrets travel in the environment only
    assert launched.env["KSCOPE_ENROLL_TOKEN"] == "token"


def test_the_agent_parses_its_command_back() -> None:
    command = AgentCommand(
        engine="openai", model="m", upstream_url="http://u:1/v1", upstream_model="up",
        engine_args=["--x", "y z"], max_concurrency=3, queue_size=4, queue_timeout_s=5.5,
    )  # fmt: skip
    argv = agent_argv(command, "/opt/python")
    assert argv[:3] == ["/opt/python", "-m", "node_agent.main"]
    settings = parse_settings(argv[3:])
    assert (settings.engine, settings.model, settings.model_path) == ("openai", "m", "")
    assert (settings.upstream_url, settings.upstream_model) == ("http://u:1/v1", "up")
    assert settings.engine_args == ["--x", "y z"]
    assert (settings.max_concurrency, settings.queue_size, settings.queue_timeout_s) == (3, 4, 5.5)


def test_unset_queue_settings_leave_the_agents_defaults() -> None:
    argv = agent_argv(AgentCommand(engine="vllm", model="m", model_path="/w"))
    assert argv[3:] == ["--engine", "vllm", "--model", "m", "--model-path", "/w"]
    settings = parse_settings(argv[3:])
    defaults = parse_settings([])
    assert settings.queue_limits() == defaults.queue_limits()
