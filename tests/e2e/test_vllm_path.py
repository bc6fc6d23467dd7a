"""The openai SDK against the facade, facade → agent → a real vLLM (CPU build)
that KScope launched itself, on a tiny random-weight model the tests build.

Tests run in file order on one shared system: the first sees the model cold and
brings it up; the destructive ones (controller and agent SIGKILL) come last.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from kscope.v1 import control_pb2
from tests.procs import (
    Controller,
    Facade,
    restart_controller,
    scrape_metrics,
    start_controller,
    start_facade,
    stop_instances_left_behind,
    vllm_cpu_args,
    wait_until,
)
from tests.slurm_cluster import processes_of, vllm_api_key

pytestmark = pytest.mark.vllm

API_KEY = "vllm-test-key"
MODEL = "tiny"
EMBED_MODEL = "tiny-embed"
ENGINE_ARGS = vllm_cpu_args(2048)
READY_TIMEOUT_S = 240


class System:
    def __init__(self, tmp: Path, controller: Controller, facade: Facade):
        self.tmp = tmp
        self.controller = controller
        self.facade = facade

    def client(self, **kw: Any) -> openai.OpenAI:
        options: dict[str, Any] = {"max_retries": 0, "timeout": 60, **kw}
        return openai.OpenAI(base_url=f"{self.facade.base_url}/v1", api_key=API_KEY, **options)

    def models(self) -> dict[str, dict[str, Any]]:
        reply = httpx.get(
            f"{self.facade.base_url}/v1/models",
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=5,
        )
        return {m["id"]: m for m in reply.json()["data"]}

    def ready_instance(self, model: str = MODEL) -> control_pb2.Instance:
        ready = [
            i
            for i in self.controller.list_instances(model=model)
            if i.state == control_pb2.INSTANCE_STATE_READY
        ]
        assert ready, "no READY instance"
        return ready[0]

    def engine_root(self, model: str = MODEL) -> str:
        return self.ready_instance(model).engine_url.removesuffix("/v1")

    def engine_key(self, model: str = MODEL) -> str:
        return vllm_api_key(self.ready_instance(model).id)

    def direct(self, model: str = MODEL) -> openai.OpenAI:
        """vLLM itself, with its key: the reference the gateway must match."""
        return openai.OpenAI(
            base_url=self.engine_root(model) + "/v1", api_key=self.engine_key(model),
            max_retries=0,
        )  # fmt: skip

    def wait_ready(self, model: str = MODEL) -> None:
        """Ask for capacity (any request does) and wait until the model is READY."""
        if self.models()[model]["state"] != "ready":
            httpx.post(
                f"{self.facade.base_url}/v1/completions",
                json={"model": model, "prompt": "x", "max_tokens": 1},
                headers={"Authorization": f"Bearer {API_KEY}"},
                timeout=30,
            )
        wait_until(lambda: self.models()[model]["state"] == "ready", READY_TIMEOUT_S, 0.5,
                   what=f"{model} ready")  # fmt: skip


@pytest.fixture(scope="module")
def system(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, vllm_python: Path
) -> Iterator[System]:
    tmp = tmp_path_factory.mktemp("vllm")
    port_file = tmp / "agent-metrics.port"
    metrics = f'KSCOPE_AGENT_METRICS_PORT = "0", KSCOPE_AGENT_METRICS_PORT_FILE = "{port_file}"'
    catalog = f"""
[[models]]
name = "{MODEL}"
engine = "vllm"
model_path = "{tiny_model}"
min_replicas = 0
max_replicas = 1
expected_startup_s = 60
engine_args = {json.dumps(ENGINE_ARGS)}
env = {{ KSCOPE_VLLM_PYTHON = "{vllm_python}", {metrics} }}

[[models]]
name = "{EMBED_MODEL}"
engine = "vllm"
model_path = "{tiny_model}"
expected_startup_s = 60
engine_args = {json.dumps([*ENGINE_ARGS, "--runner", "pooling"])}
env = {{ KSCOPE_VLLM_PYTHON = "{vllm_python}" }}
"""
    controller = start_controller(tmp, catalog)
    facade = start_facade(tmp, controller, api_key=API_KEY)
    sys_ = System(tmp, controller, facade)
    try:
        yield sys_
    finally:
        sys_.facade.proc.stop()
        sys_.controller.proc.stop(grace_s=40)
        stop_instances_left_behind(sys_.controller.state_dir)


@pytest.fixture
def ready(system: System) -> System:
    system.wait_ready()
    return system


def test_cold_model_answers_503_then_serves(system: System) -> None:
    assert system.models()[MODEL]["state"] == "cold"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
    started = time.monotonic()
    reply = httpx.post(
        f"{system.facade.base_url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=10,
    )
    elapsed = time.monotonic() - started
    assert reply.status_code == 503
    assert elapsed < 0.1, f"503 took {elapsed * 1000:.0f} ms"
    assert int(reply.headers["retry-after"]) >= 1
    assert reply.json()["error"]["code"] == "model_not_ready"
    wait_until(lambda: system.models()[MODEL]["state"] == "starting", 2, 0.05,
               what="model starting")  # fmt: skip
    # Exactly one instance was launched for the demand.
    assert len(system.controller.list_instances(model=MODEL)) == 1

    wait_until(lambda: system.models()[MODEL]["state"] == "ready", READY_TIMEOUT_S, 0.5,
               what="vLLM instance ready")  # fmt: skip
    answer = system.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=4
    )
    assert answer.choices[0].message.content
    assert answer.usage is not None and answer.usage.completion_tokens == 4
    assert len(system.controller.list_instances(model=MODEL)) == 1


def _direct(system: System) -> openai.OpenAI:
    return system.direct()


def test_vllm_answers_only_its_agent(ready: System) -> None:
    """Any other job on the node reaches vLLM's loopback port; without the
    key only its agent holds, vLLM refuses it. Its environment and command
    line carry no KScope setting or secret."""
    keyless = openai.OpenAI(base_url=ready.engine_root() + "/v1", api_key="guess", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        keyless.completions.create(model=MODEL, prompt="x", max_tokens=1)
    key = ready.engine_key()
    assert ready.direct().completions.create(model=MODEL, prompt="x", max_tokens=1).choices
    for pid in processes_of(ready.ready_instance().id):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        assert key.encode() not in cmdline
        if b"vllm.entrypoints" in cmdline:
            names = {e.split(b"=", 1)[0] for e in environ if e}
            assert {n for n in names if n.startswith(b"KSCOPE_")} <= {b"KSCOPE_INSTANCE_ID"}


def _comparable(response: Any) -> list[dict[str, Any]]:
    return [c.model_dump(exclude={"message": {"reasoning_content"}}) for c in response.choices]


CHAT: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a fox."},
]


@pytest.mark.parametrize(
    "params",
    [
        {"max_tokens": 12, "temperature": 0},
        {"max_tokens": 30, "temperature": 0, "stop": ["e", "a"]},
        {"max_tokens": 10, "temperature": 1, "seed": 7},
        {"max_tokens": 8, "temperature": 1, "seed": 3, "n": 2},
        {"max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 2},
    ],
    ids=["greedy", "stop", "seed", "n", "logprobs"],
)
def test_chat_matches_vllm_directly(ready: System, params: dict[str, Any]) -> None:
    via_gateway = ready.client().chat.completions.create(model=MODEL, messages=CHAT, **params)
    direct = _direct(ready).chat.completions.create(model=MODEL, messages=CHAT, **params)
    assert _comparable(via_gateway) == _comparable(direct)
    assert via_gateway.usage == direct.usage
    assert len(via_gateway.choices) == params.get("n", 1)


@pytest.mark.parametrize(
    "params",
    [
        {"max_tokens": 12, "temperature": 0},
        {"max_tokens": 20, "temperature": 0, "stop": [" "]},
        {"max_tokens": 6, "temperature": 1, "seed": 11, "n": 2},
        {"max_tokens": 5, "temperature": 0, "logprobs": 2},
    ],
    ids=["greedy", "stop", "n", "logprobs"],
)
def test_completions_match_vllm_directly(ready: System, params: dict[str, Any]) -> None:
    prompt = "The quick brown fox"
    via_gateway = ready.client().completions.create(model=MODEL, prompt=prompt, **params)
    direct = _direct(ready).completions.create(model=MODEL, prompt=prompt, **params)
    assert [c.model_dump() for c in via_gateway.choices] == [c.model_dump() for c in direct.choices]
    assert via_gateway.usage == direct.usage


def test_streaming_chat_is_incremental_with_usage(ready: System) -> None:
    text = []
    usage = None
    params: dict[str, Any] = {"max_tokens": 150, "temperature": 0}
    stream = ready.client().chat.completions.create(
        model=MODEL, messages=CHAT, stream=True, stream_options={"include_usage": True}, **params
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    whole = ready.client().chat.completions.create(model=MODEL, messages=CHAT, **params)
    assert "".join(text) == whole.choices[0].message.content
    assert usage is not None and usage == whole.usage
    assert usage.completion_tokens == 150


def test_tokens_reach_the_client_while_the_engine_generates(ready: System) -> None:
    """Not buffered: the client holds its first tokens long before the engine
    could have produced all of them (it stops the request right there)."""
    root = ready.engine_root()
    before = _generated_tokens(root)
    stream = ready.client().completions.create(
        model=MODEL, prompt="Go", max_tokens=1800, stream=True, extra_body={"ignore_eos": True}
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            stream.close()
            break
    wait_until(lambda: _running_requests(root) == 0, 5, 0.05, what="engine request ended")
    assert _generated_tokens(root) - before < 1800


def test_streaming_completion(ready: System) -> None:
    chunks = list(
        ready.client().completions.create(
            model=MODEL, prompt="Once", max_tokens=20, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    direct = _direct(ready).completions.create(
        model=MODEL, prompt="Once", max_tokens=20, temperature=0
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == direct.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20


def _agent_metric(ready: System, name: str) -> float:
    port = int((ready.tmp / "agent-metrics.port").read_text())
    scraped = scrape_metrics(f"http://127.0.0.1:{port}/metrics")
    return sum(v for (n, labels), v in scraped.items() if n == name and ("model", MODEL) in labels)


def test_the_agent_counts_what_vllm_generated(ready: System) -> None:
    """Tokens from vLLM's usage when it reports one, else a token per streamed
    chunk: vLLM's role and finish chunks make that overcount by at most two."""
    tokens = "kscope_agent_generation_tokens_total"
    streams = "kscope_agent_time_to_first_token_seconds_count"
    before = (_agent_metric(ready, tokens), _agent_metric(ready, streams))
    params: dict[str, Any] = {"max_tokens": 20, "extra_body": {"ignore_eos": True}}
    list(ready.client().chat.completions.create(
        model=MODEL, messages=CHAT, stream=True, stream_options={"include_usage": True}, **params
    ))  # fmt: skip
    with_usage = _agent_metric(ready, tokens)
    assert with_usage - before[0] == 20
    list(ready.client().chat.completions.create(model=MODEL, messages=CHAT, stream=True, **params))
    without_usage = _agent_metric(ready, tokens) - with_usage
    assert 20 <= without_usage <= 22
    assert _agent_metric(ready, streams) - before[1] == 2


@pytest.mark.parametrize(
    "bad",
    [
        {"max_tokens": "ten"},
        {"temperature": "hot"},
        {"messages": [{"role": "wizard", "content": 5}]},
        {"n": 0},
    ],
    ids=["max_tokens", "temperature", "messages", "n"],
)
def test_engine_rejections_are_openai_400s(ready: System, bad: dict[str, Any]) -> None:
    """What vLLM refuses reaches the client as vLLM said it: same status, same
    OpenAI error type and message as asking vLLM directly."""
    body = {"model": MODEL, "messages": CHAT, **bad}
    via_gateway = httpx.post(
        f"{ready.facade.base_url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=30,
    )
    direct = httpx.post(
        f"{ready.engine_root()}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {ready.engine_key()}"},
        timeout=30,
    )
    assert 400 <= direct.status_code < 500, direct.text  # vLLM itself refuses it
    assert via_gateway.status_code == direct.status_code, (via_gateway.text, direct.text)
    ours, theirs = via_gateway.json()["error"], direct.json()["error"]
    assert (ours["type"], ours["message"]) == (theirs["type"], theirs["message"])


def test_embeddings_when_the_engine_offers_them(system: System) -> None:
    system.wait_ready(EMBED_MODEL)
    texts = ["The quick brown fox", "jumps over the lazy dog"]
    via_gateway = system.client().embeddings.create(model=EMBED_MODEL, input=texts)
    direct = system.direct(EMBED_MODEL).embeddings.create(model=EMBED_MODEL, input=texts)
    assert [d.embedding for d in via_gateway.data] == [d.embedding for d in direct.data]
    assert len(via_gateway.data) == 2 and len(via_gateway.data[0].embedding) > 0
    assert via_gateway.usage.prompt_tokens == direct.usage.prompt_tokens > 0
    # A pooling engine has no chat endpoint: its 404 reaches the client as it is.
    with pytest.raises(openai.NotFoundError):
        system.client().chat.completions.create(model=EMBED_MODEL, messages=CHAT)


def _engine_metric(engine_root: str, name: str) -> float:
    metrics = httpx.get(engine_root + "/metrics", timeout=5).text
    for line in metrics.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not found")


def _running_requests(engine_root: str) -> float:
    return _engine_metric(engine_root, "vllm:num_requests_running")


def _generated_tokens(engine_root: str) -> float:
    return _engine_metric(engine_root, "vllm:generation_tokens_total")


def test_client_disconnect_aborts_the_engine_request(ready: System) -> None:
    root = ready.engine_root()
    before = _generated_tokens(root)
    body = {"model": MODEL, "prompt": "Long", "max_tokens": 1800, "ignore_eos": True,
            "stream": True}  # fmt: skip
    with httpx.Client(timeout=30) as http:
        with http.stream(
            "POST", f"{ready.facade.base_url}/v1/completions", json=body,
            headers={"Authorization": f"Bearer {API_KEY}"},
        ) as reply:  # fmt: skip
            lines = reply.iter_lines()
            for _ in range(6):
                next(lines)
            # The engine's own gauge sees the request (it may lag an iteration).
            wait_until(lambda: _running_requests(root) == 1, 2, 0.02, what="engine running it")
        closed_at = time.monotonic()
    wait_until(lambda: _running_requests(root) == 0, 1.0, 0.05, what="engine request aborted")
    assert time.monotonic() - closed_at < 1.0
    settled = _generated_tokens(root)
    assert settled - before < 1800  # aborted, not run to the end
    time.sleep(0.5)
    assert _generated_tokens(root) == settled  # and nothing generates any more


def _long_stream(system: System, out: dict[str, Any]) -> None:
    try:
        stream = system.client(timeout=120).completions.create(
            model=MODEL, prompt="Go", max_tokens=900, extra_body={"ignore_eos": True}, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        for chunk in stream:
            out["chunks"] = out.get("chunks", 0) + 1
            if chunk.usage is not None:
                out["usage"] = chunk.usage
        out["done"] = True
    except Exception as exc:  # recorded for the test thread to assert on
        out["error"] = exc
        out["error_at"] = time.monotonic()


def test_controller_sigkill_does_not_break_streams(ready: System) -> None:
    old = ready.ready_instance()
    out: dict[str, Any] = {}
    worker = threading.Thread(target=_long_stream, args=(ready, out))
    worker.start()
    wait_until(lambda: out.get("chunks", 0) > 5 or "error" in out, 30, 0.02, what="stream started")
    assert "error" not in out, out
    ready.controller.proc.kill()
    worker.join(120)
    assert out.get("done"), out.get("error")
    assert out["usage"].completion_tokens == 900

    ready.controller = restart_controller(ready.controller, ready.tmp)
    started = time.monotonic()
    wait_until(
        lambda: any(a.instance_id == old.id for a in ready.controller.list_agents()),
        5, 0.1, what="agent attached again",
    )  # fmt: skip
    assert time.monotonic() - started < 5
    back = ready.controller.list_instances(model=MODEL)
    assert [i.id for i in back] == [old.id]
    assert back[0].state == control_pb2.INSTANCE_STATE_READY
    assert back[0].agent_id == old.agent_id
    health_url = f"{ready.facade.base_url}/health"
    with httpx.Client() as http:  # the facade found the new controller too
        wait_until(lambda: http.get(health_url).json()["controller_connected"], 10,
                   what="facade reconnected")  # fmt: skip
    answer = ready.client().completions.create(model=MODEL, prompt="x", max_tokens=3)
    assert answer.usage is not None and answer.usage.completion_tokens == 3


def test_agent_sigkill_mid_stream(ready: System) -> None:
    victim = ready.ready_instance()
    agent = next(a for a in ready.controller.list_agents() if a.instance_id == victim.id)
    out: dict[str, Any] = {}
    worker = threading.Thread(target=_long_stream, args=(ready, out))
    worker.start()
    wait_until(lambda: out.get("chunks", 0) > 5 or "error" in out, 30, 0.02, what="stream started")
    assert "error" not in out, out
    os.kill(agent.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    worker.join(10)
    assert not worker.is_alive(), "the client hangs"
    assert isinstance(out.get("error"), openai.APIError), out
    assert out["error_at"] - killed_at < 2.0

    def failed() -> bool:
        ended = ready.controller.list_instances(model=MODEL, include_ended=True)
        return any(
            i.id == victim.id and i.state == control_pb2.INSTANCE_STATE_FAILED for i in ended
        )

    wait_until(failed, 10, 0.1, what="instance FAILED")
    # New requests never go to the dead instance: no READY capacity means 503.
    with pytest.raises(openai.APIStatusError) as info:
        ready.client().completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert info.value.status_code == 503
    # vLLM died with its agent (parent-death signal), not orphaned.
    wait_until(lambda: not _engine_alive(victim.engine_url), 20, 0.2, what="engine gone")


def _engine_alive(engine_url: str) -> bool:
    try:
        httpx.get(engine_url.removesuffix("/v1") + "/health", timeout=1)
    except httpx.HTTPError:
        return False
    return True
