"""An agent run inside `kscope serve`'s process gets exactly the settings its
process would have, and only engines that do no compute in the agent run there."""

from __future__ import annotations

import asyncio
import socket

import pytest

from controller.launchers.base import AgentInvocation
from controller.launchers.in_process import InProcessAgents
from kscope_common.capabilities import Capabilities
from kscope_common.cli import AgentCommand, agent_argv, agent_flags
from node_agent import local_agents
from node_agent.capabilities import DiscoveryError
from node_agent.daemon import Agent
from node_agent.in_process import NotInProcess, settings_for
from node_agent.load import Load
from node_agent.queue import QueueLimits, RequestQueue
from node_agent.request_life import AgentCore
from tests.unit.test_request_life import FakeEngine

OPENAI = AgentCommand(
    engine="openai", model="m", upstream_url="http://127.0.0.1:9/v1", max_concurrency=3,
    queue_size=7, aliases=("other",),
)  # fmt: skip
ENV = {
    "KSCOPE_CONTROLLER": "127.0.0.1:5",
    "KSCOPE_INSTANCE_ID": "m-1",
    "KSCOPE_ENROLL_TOKEN": "secret",
    "KSCOPE_TLS_CA": "-----BEGIN CERTIFICATE-----",
}


def test_settings_are_the_flags_then_the_environment_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # This process's own environment counts below what the launcher gives, as a
    # child's inherited environment would.
    monkeypatch.setenv("KSCOPE_INSTANCE_ID", "not-this-one")
    monkeypatch.setenv("KSCOPE_DRAIN_TIMEOUT_S", "7")
    settings = settings_for(agent_flags(OPENAI), ENV)
    assert (settings.engine, settings.model, settings.upstream_url) == (
        "openai", "m", "http://127.0.0.1:9/v1",
    )  # fmt: skip
    assert (settings.max_concurrency, settings.queue_size) == (3, 7)
    assert settings.aliases == ["other"]
    assert settings.controller == "127.0.0.1:5"
    assert settings.instance_id == "m-1"
    assert settings.enroll_token.get_secret_value() == "secret"
    assert settings.tls_ca == "-----BEGIN CERTIFICATE-----"
    assert settings.drain_timeout_s == 7
    # A variable behind an alias is read by that name, as the child reads it.
    aliased = settings_for(agent_flags(OPENAI), {**ENV, "KSCOPE_AGENT_ORPHAN_TIMEOUT_S": "60"})
    assert aliased.agent_orphan_timeout_s == 60


def test_an_mlx_agent_stays_a_process() -> None:
    command = AgentCommand(engine="mlx_vlm", model="m", model_path="/w")
    with pytest.raises(NotInProcess, match="mlx_vlm"):
        settings_for(agent_flags(command), ENV)


def test_an_engine_environment_keeps_the_agent_a_process() -> None:
    with pytest.raises(NotInProcess, match="CUDA_VISIBLE_DEVICES"):
        settings_for(agent_flags(OPENAI), {**ENV, "CUDA_VISIBLE_DEVICES": "1"})


def test_the_launcher_falls_back_to_a_process_for_what_cannot_run_here() -> None:
    agents = InProcessAgents(stop_grace_s=1)
    command = AgentCommand(engine="mlx_vlm", model="m", model_path="/w")
    invocation = AgentInvocation(agent_argv(command, "python"), ENV, agent_flags(command))
    assert agents.launch("m-1", invocation) is None
    # A reference it does not hold (from before a restart) is an ended agent.
    assert agents.observe("in-process:m-0").reason == "agent process is gone"


def test_a_facade_finds_only_an_agent_published_at_the_address_it_was_told() -> None:
    load = Load()
    core = AgentCore(FakeEngine([]), load, RequestQueue(QueueLimits(), load))
    local_agents.publish("m-1", "127.0.0.1:7000", core)
    try:
        assert local_agents.local_agent("m-1", "127.0.0.1:7000") is core
        assert local_agents.local_agent("m-1", "10.0.0.2:7000") is None  # another agent
        assert local_agents.local_agent("m-2", "127.0.0.1:7000") is None
        local_agents.withdraw("m-1", AgentCore(core.engine, load, core.queue))  # not this one
        assert local_agents.local_agent("m-1", "127.0.0.1:7000") is core
    finally:
        local_agents.withdraw("m-1", core)
    assert local_agents.local_agent("m-1", "127.0.0.1:7000") is None


class StoppedEngine(FakeEngine):
    """A FakeEngine that records its stop."""

    stopped = 0

    async def stop(self) -> None:
        self.stopped += 1


class NoDiscovery:
    async def discover(self) -> Capabilities:
        raise DiscoveryError("not asked in this test")

    async def close(self) -> None:
        pass


async def test_an_agent_cancelled_in_its_process_leaves_nothing_running() -> None:
    # An in-process agent cancelled after the stop grace (it would not drain)
    # must end as a killed process would: engine, server, link, registry.
    settings = settings_for(
        agent_flags(OPENAI),
        {"KSCOPE_CONTROLLER": "127.0.0.1:9", "KSCOPE_INSTANCE_ID": "m-1",
         "KSCOPE_INSECURE_PLAINTEXT": "1", "KSCOPE_HOST": "127.0.0.1"},
    )  # fmt: skip
    engine = StoppedEngine()
    agent = Agent(settings, engine=engine, discovery=NoDiscovery())
    task = asyncio.create_task(agent.run(in_process=True))
    async with asyncio.timeout(10):
        while local_agents.local_agent("m-1", agent.advertised_address()) is None:
            await asyncio.sleep(0.01)  # serving, published, its link retrying a dead controller
    assert agent.server is not None and agent.link is not None
    tasks_before = {t.get_name() for t in asyncio.all_tasks()}
    assert {"controller-link", "engine-watch", "capabilities"} <= tasks_before
    task.cancel()
    await asyncio.wait({task}, timeout=10)
    assert task.done()
    assert engine.stopped == 1
    assert local_agents.local_agent("m-1", agent.advertised_address()) is None
    await asyncio.sleep(0)
    left = {t.get_name() for t in asyncio.all_tasks() if not t.done()}
    assert not left & {"controller-link", "engine-watch", "capabilities"}
    with socket.socket() as probe:  # its gRPC port is closed
        assert probe.connect_ex(("127.0.0.1", agent.port)) != 0
