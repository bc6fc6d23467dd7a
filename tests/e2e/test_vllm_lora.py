"""Capabilities, LoRA adapters, aliases and /v1/models per key, on real
engines: one vLLM (CPU build) serving the tiny Qwen2 with a tiny LoRA adapter
the test builds (tools/tiny_lora.py) and an alias, and one MLX-VLM serving the
tiny Qwen2-VL, behind a facade that requires keys.

The refusals before routing (image input, an endpoint not offered, a prompt
plainly past the context) need the facade's proxy to call
facade/capabilities.py (`requirement_of` / `refusal`) before it picks an
instance; the other tests need only the route table and /v1/models.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from kscope.v1 import control_pb2, keys_pb2, keys_pb2_grpc
from tests.procs import (
    ROOT,
    Controller,
    Facade,
    agent_metrics_env,
    agent_requests,
    assert_agent_counts,
    start_controller,
    start_facade,
    stop_instances_left_behind,
    vllm_cpu_args,
    wait_until,
)
from tests.slurm_cluster import vllm_api_key

pytestmark = [pytest.mark.vllm, pytest.mark.mlx]

STATIC_KEY = "capabilities-test-key"
MODEL = "tiny"
ALIAS = "gpt-4o-mini"
ADAPTER = "tiny-sql"
VLM = "tiny-vlm"
MAX_MODEL_LEN = 512
ENGINE_ARGS = vllm_cpu_args(MAX_MODEL_LEN)
READY_TIMEOUT_S = 300


@dataclass
class System:
    tmp: Path
    controller: Controller
    facade: Facade

    def client(self, key: str = STATIC_KEY) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.facade.base_url}/v1", api_key=key, max_retries=0, timeout=120
        )

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(
            f"{self.facade.base_url}{path}", json=body,
            headers={"Authorization": f"Bearer {STATIC_KEY}"}, timeout=120,
        )  # fmt: skip

    def models(self, key: str = STATIC_KEY) -> dict[str, dict[str, Any]]:
        reply = httpx.get(
            f"{self.facade.base_url}/v1/models",
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        )
        reply.raise_for_status()
        return {m["id"]: m for m in reply.json()["data"]}

    def instance(self, model: str = MODEL) -> control_pb2.Instance:
        (ready,) = [
            i for i in self.controller.list_instances(model=model)
            if i.state == control_pb2.INSTANCE_STATE_READY
        ]  # fmt: skip
        return ready

    def engine_root(self) -> str:
        return self.instance().engine_url.removesuffix("/v1")

    def engine_key(self) -> str:
        return vllm_api_key(self.instance().id)

    def direct(self) -> openai.OpenAI:
        """vLLM itself: the reference KScope must match."""
        return openai.OpenAI(
            base_url=self.engine_root() + "/v1", api_key=self.engine_key(), max_retries=0,
            timeout=120,
        )  # fmt: skip

    def direct_post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(
            f"{self.engine_root()}{path}", json=body,
            headers={"Authorization": f"Bearer {self.engine_key()}"}, timeout=120,
        )  # fmt: skip

    def agent_requests(self, model: str) -> float:
        """Requests the model's agents counted (kscope_agent_requests_total)."""
        return agent_requests(self.tmp / f"{model}-metrics.port", model)

    def assert_counted(self, model: str) -> None:
        """The positive control beside an unchanged count: a plain chat the
        model accepts is counted by its agent."""
        hi = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}

        def send() -> None:
            self.post("/v1/chat/completions", hi).raise_for_status()

        assert_agent_counts(self.tmp / f"{model}-metrics.port", model, send)

    def create_key(self, models: list[str]) -> str:
        with self.controller.channel() as channel:
            reply = keys_pb2_grpc.KeyServiceStub(channel).CreateKey(
                keys_pb2.CreateKeyRequest(owner="carol", name="limited", models=models), timeout=5
            )
        return reply.secret


def _metrics_env(tmp: Path, model: str) -> str:
    return agent_metrics_env(tmp / f"{model}-metrics.port")


@pytest.fixture(scope="module")
def system(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, tiny_vlm: Path, vllm_python: Path
) -> Iterator[System]:
    tmp = tmp_path_factory.mktemp("capabilities")
    adapter = tmp / "tiny-sql-lora"
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "tiny_lora.py"), str(tiny_model), str(adapter)],
        check=True, timeout=60,
    )  # fmt: skip
    catalog = f"""
[[models]]
name = "{MODEL}"
engine = "vllm"
model_path = "{tiny_model}"
aliases = ["{ALIAS}"]
lora_modules = [{{ name = "{ADAPTER}", path = "{adapter}" }}]
min_replicas = 1
expected_startup_s = 60
engine_args = {json.dumps(ENGINE_ARGS)}
env = {{ KSCOPE_VLLM_PYTHON = "{vllm_python}", {_metrics_env(tmp, MODEL)} }}

[[models]]
name = "{VLM}"
engine = "mlx_vlm"
model_path = "{tiny_vlm}"
min_replicas = 1
expected_startup_s = 5
env = {{ {_metrics_env(tmp, VLM)} }}
"""
    controller = start_controller(tmp, catalog)
    facade: Facade | None = None
    try:
        facade = start_facade(tmp, controller, api_key=STATIC_KEY)
        system = System(tmp, controller, facade)
        wait_until(
            lambda: all(system.models()[m]["state"] == "ready" for m in (MODEL, ADAPTER, VLM)),
            READY_TIMEOUT_S, 0.5, what="vLLM with its adapter, and MLX-VLM, ready",
        )  # fmt: skip
        yield system
    finally:
        if facade is not None:
            facade.proc.stop()
        controller.proc.stop(grace_s=40)
        stop_instances_left_behind(controller.state_dir)


# --- LoRA adapters ---------------------------------------------------------------------------


def test_the_adapter_is_listed_with_its_parent_as_vllm_lists_it(system: System) -> None:
    ours = system.models()
    theirs = {m.id: m for m in system.direct().models.list()}
    assert theirs[ADAPTER].model_dump()["parent"] == MODEL  # vLLM's own listing
    assert ours[ADAPTER]["parent"] == MODEL
    assert (ours[ADAPTER]["state"], ours[ADAPTER]["ready_replicas"]) == ("ready", 1)
    assert ours[MODEL]["parent"] is None
    assert ours[MODEL]["capabilities"]["lora_adapters"] == [ADAPTER]


def test_the_adapter_answers_through_kscope_as_vllm_does(system: System) -> None:
    messages: list[Any] = [{"role": "user", "content": "Write a query."}]
    params: dict[str, Any] = {"max_tokens": 16, "temperature": 0}
    via_gateway = system.client().chat.completions.create(
        model=ADAPTER, messages=messages, **params
    )
    direct = system.direct().chat.completions.create(model=ADAPTER, messages=messages, **params)
    base = system.direct().chat.completions.create(model=MODEL, messages=messages, **params)
    assert via_gateway.choices[0].message.content == direct.choices[0].message.content
    assert via_gateway.model == direct.model == ADAPTER
    # The adapter really is applied: the base model answers otherwise.
    assert direct.choices[0].message.content != base.choices[0].message.content


# --- capabilities ----------------------------------------------------------------------------


def test_models_show_what_the_engines_can_do(system: System) -> None:
    models = system.models()
    version = httpx.get(system.engine_root() + "/version", timeout=10).json()["version"]
    tiny = models[MODEL]["capabilities"]
    assert models[MODEL]["max_model_len"] == tiny["max_model_len"] == MAX_MODEL_LEN
    assert (tiny["engine"], tiny["engine_version"], tiny["runner"]) == ("vllm", version, "generate")
    assert tiny["input_modalities"] == ["text"]
    assert {"chat_completions", "completions"} <= set(tiny["endpoints"])
    vlm = models[VLM]["capabilities"]
    assert (vlm["endpoints"], vlm["input_modalities"]) == (["chat_completions"], ["image", "text"])
    assert (vlm["tools"], vlm["engine"]) == (False, "mlx_vlm")


def _png_data_url() -> str:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def test_an_image_to_the_text_only_model_is_refused_before_routing(system: System) -> None:
    """Needs the proxy's capability check (facade/capabilities.py)."""
    content = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": _png_data_url()}},
    ]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 8}
    before = system.agent_requests(MODEL)
    refused = system.post("/v1/chat/completions", {"model": MODEL, **body})
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["message"] == f"model '{MODEL}' does not accept image input"
    # No agent saw it.
    assert system.agent_requests(MODEL) == before
    system.assert_counted(MODEL)
    # The same image to the vision model is answered.
    answered = system.post("/v1/chat/completions", {"model": VLM, "temperature": 0, **body})
    assert answered.status_code == 200, answered.text
    assert answered.json()["usage"]["completion_tokens"] == 8


def test_an_endpoint_the_model_does_not_offer_is_404_before_routing(system: System) -> None:
    """Needs the proxy's capability check (facade/capabilities.py)."""
    before = system.agent_requests(VLM)
    reply = system.post("/v1/completions", {"model": VLM, "prompt": "Hello", "max_tokens": 2})
    assert reply.status_code == 404, reply.text
    assert reply.json()["error"]["message"] == f"model '{VLM}' does not offer /v1/completions"
    assert system.agent_requests(VLM) == before
    system.assert_counted(VLM)


def test_a_prompt_plainly_past_the_context_gets_vllms_own_error(system: System) -> None:
    """Needs the proxy's capability check (facade/capabilities.py). The
    gateway's answer is vLLM's own answer to the same request, word for word."""
    body = {"model": MODEL, "prompt": "a" * 40_000, "max_tokens": 1}
    before = system.agent_requests(MODEL)
    via_gateway = system.post("/v1/completions", body)
    assert system.agent_requests(MODEL) == before  # refused in the facade
    system.assert_counted(MODEL)
    direct = system.direct_post("/v1/completions", body)
    assert direct.status_code == 400, direct.text
    assert via_gateway.status_code == 400, via_gateway.text
    assert via_gateway.json() == direct.json()


# --- aliases and keys ------------------------------------------------------------------------


def test_an_alias_answers_like_its_model(system: System) -> None:
    params: dict[str, Any] = {"prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0}
    by_alias = system.client().completions.create(model=ALIAS, **params)
    by_name = system.client().completions.create(model=MODEL, **params)
    assert by_alias.choices[0].text == by_name.choices[0].text
    assert by_alias.model == by_name.model == MODEL  # vLLM answers with its first name
    assert system.models()[ALIAS]["alias_of"] == MODEL
    assert system.models()[MODEL]["aliases"] == [ALIAS]


def test_a_key_limited_to_tiny_star_lists_only_those(system: System) -> None:
    key = system.create_key(["tiny*"])
    assert sorted(system.models(key)) == [MODEL, ADAPTER, VLM]
    assert ALIAS in system.models()
    listed = httpx.get(
        f"{system.facade.base_url}/v1/models/{ALIAS}",
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )
    assert listed.status_code == 404
    with pytest.raises(openai.PermissionDeniedError):
        system.client(key).completions.create(model=ALIAS, prompt="x", max_tokens=1)
    answer = system.client(key).completions.create(model=ADAPTER, prompt="x", max_tokens=2)
    assert answer.usage is not None and answer.usage.completion_tokens == 2
