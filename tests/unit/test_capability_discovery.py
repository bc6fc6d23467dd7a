"""How an agent learns what its engine can do (node_agent/capabilities.py),
against a fake vLLM: a real aiohttp server on port 0 answering /v1/models,
/version and /openapi.json as vLLM 0.32 does; and how it reaches the
controller (controller_link.py, the fleet, the catalog's declarations)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from controller.catalog import Catalog, CatalogError, parse_catalog
from controller.convert import command_to_proto
from controller.fleet import AgentReport, Fleet, LoadModelCommand
from controller.launchers.base import LaunchSpec, agent_invocation
from controller.lifecycle import AgentPhase, InstanceState, LauncherPhase
from controller.records import AgentRecord
from controller.store.sqlite import SqliteStore
from kscope.v1 import agent_pb2
from kscope_common.capabilities import Capabilities, LoraAdapter
from kscope_common.capabilities import Capabilities as Recorded
from kscope_common.request_stats import RequestTotals
from node_agent.capabilities import (
    DiscoveryError,
    MlxDiscovery,
    UpstreamDiscovery,
    VllmDiscovery,
    longest_token,
    read_model_directory,
)
from node_agent.controller_link import ControllerLink, Report
from node_agent.engines.vllm import VllmEngine, lora_flags
from node_agent.host import instance_argv
from node_agent.main import parse_settings

KEY = "engine-key"
GENERATE_PATHS = [
    "/health", "/version", "/v1/models", "/v1/chat/completions", "/v1/completions",
    "/v1/responses", "/tokenize", "/detokenize", "/v1/load_lora_adapter",
]  # fmt: skip
POOLING_PATHS = ["/health", "/v1/models", "/v1/embeddings", "/pooling", "/tokenize"]


class FakeVllm:
    """A fake vLLM (named as one): the three answers the agent asks for."""

    def __init__(self, models: dict[str, Any], paths: list[str] | None, version: str = "0.32.0"):
        self.models = models
        self.paths = paths
        self.version = version
        self.seen_keys: list[str] = []
        self.runner: web.AppRunner | None = None
        self.root = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/version", self._version)
        if self.paths is not None:
            app.router.add_get("/openapi.json", self._openapi)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.root = f"http://127.0.0.1:{port}"

    async def _models(self, request: web.Request) -> web.Response:
        self.seen_keys.append(request.headers.get("Authorization", ""))
        if request.headers.get("Authorization") != f"Bearer {KEY}":
            return web.json_response({"error": "Unauthorized"}, status=401)
        return web.json_response(self.models)

    async def _version(self, _: web.Request) -> web.Response:
        return web.json_response({"version": self.version})

    async def _openapi(self, _: web.Request) -> web.Response:
        return web.json_response({"openapi": "3.1.0", "paths": {p: {} for p in self.paths or []}})

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def _models(max_len: int = 512, adapters: tuple[str, ...] = ()) -> dict[str, Any]:
    """vLLM 0.32's /v1/models: the served names, then each LoRA adapter with its parent."""
    data: list[dict[str, Any]] = [
        {"id": name, "object": "model", "root": "/m/tiny", "parent": None, "max_model_len": max_len}
        for name in ("tiny", "tiny-alias")
    ]
    data += [{"id": a, "object": "model", "root": f"/m/{a}", "parent": "tiny"} for a in adapters]
    return {"object": "list", "data": data}


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A model directory with a config and a tokenizer whose longest token is 11 characters."""
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 4096}))
    tokenizer = {
        "model": {"type": "BPE", "vocab": {"a": 0, "Ġthe": 1, "ĠĠĠĠ": 2}},
        "added_tokens": [{"id": 3, "content": "<|im_end|>"}, {"id": 4, "content": "<|im_start|>"}],
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer))
    return tmp_path


async def _discover(fake: FakeVllm, args: list[str], model_dir: Path) -> Capabilities:
    await fake.start()
    discovery = VllmDiscovery(fake.root, KEY, "tiny", args, str(model_dir))
    try:
        return await discovery.discover()
    finally:
        await discovery.close()
        await fake.stop()


async def test_vllm_generate_runner_with_lora_adapters(model_dir: Path) -> None:
    fake = FakeVllm(_models(512, ("tiny-sql", "tiny-chat")), GENERATE_PATHS)
    learned = await _discover(fake, ["--enable-lora", "--max-model-len", "512"], model_dir)
    assert learned == Capabilities(
        endpoints=frozenset({"chat_completions", "completions", "responses", "tokenize"}),
        input_modalities=frozenset({"text"}),
        tools=False,
        structured_output=True,
        max_model_len=512,
        max_chars_per_token=len("<|im_start|>"),
        lora_adapters=(LoraAdapter("tiny-chat", "tiny"), LoraAdapter("tiny-sql", "tiny")),
        engine="vllm",
        engine_version="0.32.0",
        runner="generate",
    )
    assert fake.seen_keys == [f"Bearer {KEY}"]  # vLLM wants its key; the agent has it


async def test_vllm_pooling_runner(model_dir: Path) -> None:
    fake = FakeVllm(_models(128), POOLING_PATHS, version="0.32.1")
    learned = await _discover(fake, ["--runner", "pooling"], model_dir)
    assert learned.endpoints == frozenset({"embeddings", "pooling", "tokenize"})
    assert (learned.runner, learned.tools, learned.structured_output) == ("pooling", False, False)
    assert (learned.max_model_len, learned.engine_version) == (128, "0.32.1")


async def test_vllm_without_an_api_document_falls_back_on_its_flags(model_dir: Path) -> None:
    fake = FakeVllm(_models(256), None)
    args = ["--runner=generate", "--tool-call-parser", "hermes", "--enable-auto-tool-choice"]
    learned = await _discover(fake, args, model_dir)
    assert learned.endpoints == frozenset()  # not known: the facade refuses no endpoint
    assert (learned.runner, learned.tools, learned.structured_output) == ("generate", True, True)


async def test_a_vision_model_with_images_turned_off(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": {"depth": 1}}))
    fake = FakeVllm(_models(), GENERATE_PATHS)
    learned = await _discover(fake, [], tmp_path)
    assert learned.input_modalities == frozenset({"text", "image"})
    fake = FakeVllm(_models(), GENERATE_PATHS)
    off = await _discover(fake, ["--limit-mm-per-prompt", '{"image": 0}'], tmp_path)
    assert off.input_modalities == frozenset({"text"})


async def test_an_engine_that_does_not_answer_is_a_discovery_error(model_dir: Path) -> None:
    fake = FakeVllm(_models(), GENERATE_PATHS)
    await fake.start()
    wrong_key = VllmDiscovery(fake.root, "guess", "tiny", [], str(model_dir))
    with pytest.raises(DiscoveryError, match="HTTP 401"):
        await wrong_key.discover()
    await wrong_key.close()
    root = fake.root
    await fake.stop()
    gone = VllmDiscovery(root, KEY, "tiny", [], str(model_dir))
    with pytest.raises(DiscoveryError):
        await gone.discover()
    await gone.close()


async def test_an_openai_upstream_tells_its_context_length(model_dir: Path) -> None:
    fake = FakeVllm(_models(1024), None)
    await fake.start()
    upstream = UpstreamDiscovery(fake.root + "/v1", "tiny", KEY)
    try:
        learned = await upstream.discover()
    finally:
        await upstream.close()
        await fake.stop()
    assert learned == Capabilities(max_model_len=1024, engine="openai")


async def test_mlx_is_chat_only_text_and_image_without_tools(tmp_path: Path) -> None:
    config = {"vision_config": {}, "text_config": {"max_position_embeddings": 2048}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    learned = await MlxDiscovery(str(tmp_path)).discover()
    assert learned.endpoints == frozenset({"chat_completions"})
    assert learned.input_modalities == frozenset({"text", "image"})
    assert (learned.tools, learned.structured_output) == (False, False)
    assert (learned.max_model_len, learned.engine) == (2048, "mlx_vlm")


def test_the_longest_token_counts_the_vocabulary_and_added_tokens(model_dir: Path) -> None:
    assert read_model_directory(str(model_dir)).max_chars_per_token == 12
    unigram = {"model": {"type": "Unigram", "vocab": [["▁hello", -1.0], ["x", -2.0]]}}
    assert longest_token(unigram) == 6
    assert read_model_directory("").max_chars_per_token == 0


# --- vLLM's command line ----------------------------------------------------------------------


def test_lora_flags_fit_the_adapters(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.mkdir()
    (big / "adapter_config.json").write_text(json.dumps({"r": 24}))
    modules = [f"small={tmp_path / 'missing'}", f"big={big}"]
    assert lora_flags(modules, []) == [
        "--enable-lora", "--lora-modules", *modules, "--max-loras", "2", "--max-lora-rank", "32",
    ]  # fmt: skip
    given = ["--enable-lora", "--max-loras=4", "--max-lora-rank", "64"]
    assert lora_flags(modules, given) == ["--lora-modules", *modules]
    assert lora_flags([], given) == []


# --- reporting them --------------------------------------------------------------------------


class _NoController:
    """The link's controller connection, unused by what is tested here."""


async def test_reports_carry_capabilities_only_when_they_changed() -> None:
    current: dict[str, Any] = {"caps": None}

    def report() -> Report:
        return Report(agent_pb2.AGENT_PHASE_READY, 0, 0, "ok", capabilities=current["caps"])

    link = ControllerLink(_NoController(), None, report, lambda _: None)  # type: ignore[arg-type]
    link._interval_s = 0.01
    outgoing = link._outgoing()
    assert (await anext(outgoing)).WhichOneof("message") == "hello"
    assert not (await anext(outgoing)).load_report.HasField("capabilities")
    current["caps"] = Capabilities(max_model_len=64, engine="vllm")
    first = (await anext(outgoing)).load_report
    assert first.capabilities == agent_pb2.Capabilities(max_model_len=64, engine="vllm")
    assert not (await anext(outgoing)).load_report.HasField("capabilities")
    current["caps"] = Capabilities(max_model_len=128, engine="vllm")
    assert (await anext(outgoing)).load_report.capabilities.max_model_len == 128
    link.close()
    await outgoing.aclose()  # type: ignore[attr-defined]


def test_capabilities_cross_the_wire_unchanged() -> None:
    learned = Capabilities(
        endpoints=frozenset({"chat_completions", "rerank"}),
        input_modalities=frozenset({"text", "audio"}), tools=True, structured_output=False,
        max_model_len=9, max_chars_per_token=3, lora_adapters=(LoraAdapter("a", "m"),),
        engine="vllm", engine_version="1", runner="generate",
    )  # fmt: skip
    recorded = Recorded.from_proto(learned.to_proto())
    assert recorded == Recorded(
        endpoints=learned.endpoints, input_modalities=learned.input_modalities, tools=True,
        structured_output=False, max_model_len=9, max_chars_per_token=3,
        lora_adapters=(LoraAdapter("a", "m"),), engine="vllm", engine_version="1",
        runner="generate",
    )  # fmt: skip
    assert recorded.to_proto() == learned.to_proto()
    assert not Recorded().to_proto().HasField("tools")


# --- the catalog -----------------------------------------------------------------------------


def _catalog(**fields: Any) -> Catalog:
    return parse_catalog({"models": [{"name": "tiny", "model_path": "/m", **fields}]})


def test_catalog_aliases_adapters_and_declared_capabilities() -> None:
    catalog = _catalog(
        aliases=["gpt-4o-mini"],
        lora_modules=[{"name": "tiny-sql", "path": "/adapters/sql"}],
        capabilities={"tools": True, "input_modalities": ["text", "image"], "max_model_len": 64},
    )
    spec = catalog.models[0]
    assert spec.names == ("tiny", "gpt-4o-mini", "tiny-sql")
    assert catalog.resolve("gpt-4o-mini") is spec and catalog.resolve("tiny-sql") is spec
    assert catalog.resolve("nothing") is None and catalog.get("gpt-4o-mini") is None
    assert spec.capabilities is not None
    assert spec.capabilities.over(Recorded(max_model_len=2048, tools=False), "vllm") == Recorded(
        max_model_len=64, tools=True, input_modalities=frozenset({"text", "image"})
    )


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"lora_modules": [{"name": "x", "path": "relative"}]}, "path must be absolute"),
        (
            {"lora_modules": [{"name": "x", "path": "/a"}], "engine": "mlx_vlm"},
            "need engine 'vllm'",
        ),
        ({"aliases": ["bad name"]}, "is not a valid model name"),
        ({"aliases": ["tiny"]}, "duplicate model names"),
        ({"capabilities": {"endpoints": ["chat"]}}, "endpoints"),
        ({"capabilities": {"max_model_len": 0}}, "max_model_len"),
    ],
)
def test_catalog_refuses_bad_names_and_capabilities(fields: dict[str, Any], needle: str) -> None:
    with pytest.raises(CatalogError, match=needle):
        _catalog(**fields)


def test_names_are_unique_across_models_aliases_and_adapters() -> None:
    with pytest.raises(CatalogError, match=r"duplicate model names.*: shared"):
        parse_catalog({"models": [
            {"name": "a", "model_path": "/m", "aliases": ["shared"]},
            {"name": "b", "model_path": "/m", "lora_modules": [{"name": "shared", "path": "/l"}]},
        ]})  # fmt: skip


# --- the fleet keeps them and pushes them ----------------------------------------------------


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    store = SqliteStore(tmp_path / "state.db")
    catalog = parse_catalog({"models": [{
        "name": "m", "model_path": "/m", "max_replicas": 2, "aliases": ["m-alias"],
        "capabilities": {"tools": True},
    }]})  # fmt: skip
    yield Fleet(store, catalog, clock=lambda: 1000.0)
    store.close()


async def _ready_instance(fleet: Fleet, caps: Recorded | None) -> str:
    spec = fleet.catalog.models[0]
    inst = await fleet.create_instance(spec)
    await fleet.record_launch(inst.id, f"pid-{inst.id}")
    fleet.observe_launcher(inst.id, LauncherPhase.RUNNING, "")
    agent = await fleet.register_agent(
        AgentRecord(id="", instance_id=inst.id, address=f"h:{inst.seq}", capabilities=caps)
    )
    fleet.open_session(agent.id, None)
    fleet.report(AgentReport(agent.id, AgentPhase.READY, 0, 0, "ok", RequestTotals()))
    await fleet.refresh(1000.0)
    assert fleet.instances[inst.id].state is InstanceState.READY
    return agent.id


async def test_the_fleet_unites_its_instances_and_the_catalog_has_the_last_word(
    fleet: Fleet,
) -> None:
    image = Recorded(input_modalities=frozenset({"text", "image"}), max_model_len=100, tools=False)
    text = Recorded(input_modalities=frozenset({"text"}), max_model_len=200, tools=False)
    first = await _ready_instance(fleet, image)
    await _ready_instance(fleet, text)
    (route,) = fleet.routes()
    model, per_instance = fleet.route_capabilities(route)
    assert model == Recorded(
        input_modalities=frozenset({"text", "image"}), max_model_len=200, tools=True
    )
    assert sorted(c.max_model_len for c in per_instance.values() if c) == [100, 200]
    assert all(c is not None and c.tools for c in per_instance.values())  # declared
    # A change in what an instance can do is a new route table for the facades.
    version = fleet.route_version
    fleet.report(AgentReport(first, AgentPhase.READY, 0, 0, "ok", RequestTotals(),
                             capabilities=Recorded(max_model_len=300)))  # fmt: skip
    await fleet.refresh(1000.0)
    assert fleet.route_version == version + 1
    assert fleet.model_capabilities("m") == Recorded(max_model_len=300, tools=True)


async def test_demand_for_an_alias_is_demand_for_its_model(fleet: Fleet) -> None:
    summary = fleet.demand("m-alias")
    assert summary.spec.name == "m"
    assert fleet.demanded == frozenset({"m"})


async def test_a_model_without_instances_keeps_what_it_last_could(fleet: Fleet) -> None:
    agent = await _ready_instance(fleet, Recorded(max_model_len=77))
    inst = fleet.agents[agent].instance_id
    await fleet.request_stop(inst)
    fleet.close_session(agent, asyncio.Queue())
    await fleet.refresh(1000.0)
    assert fleet.model_capabilities("m") == Recorded(max_model_len=77, tools=True)


# --- the agent's command carries aliases and adapters ---------------------------------------


def test_every_launcher_gives_the_agent_the_aliases_and_adapters(tmp_path: Path) -> None:
    spec = _catalog(
        aliases=["gpt-4o-mini"], lora_modules=[{"name": "tiny-sql", "path": "/adapters/sql"}]
    ).models[0]
    launched = agent_invocation(LaunchSpec("i-1", spec, "127.0.0.1:1", "")).argv
    load = command_to_proto(LoadModelCommand("i-1", spec)).load_model
    hosted = instance_argv(load, tmp_path)
    for argv in (launched, hosted):
        settings = parse_settings(argv[3:])  # past `python -m node_agent.main`
        assert (settings.aliases, settings.lora_modules) == (
            ["gpt-4o-mini"],
            ["tiny-sql=/adapters/sql"],
        )
    engine = VllmEngine(
        "python", "/m", "tiny", ["--max-loras", "2"], aliases=["tiny", "gpt-4o-mini"],
        lora_modules=["tiny-sql=/adapters/sql"],
    )  # fmt: skip
    argv = engine.command()
    at = argv.index("--served-model-name")
    assert argv[at + 1 : at + 4] == ["tiny", "gpt-4o-mini", "--host"]
    # The catalog's engine_args come last and keep their word (--max-loras 2).
    assert argv[-5:] == [
        "--enable-lora", "--lora-modules", "tiny-sql=/adapters/sql", "--max-loras", "2",
    ]  # fmt: skip
