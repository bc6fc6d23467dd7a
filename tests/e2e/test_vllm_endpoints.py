"""The endpoints beyond chat, completions and embeddings, through KScope to a
real vLLM (CPU build) that KScope launched, compared with the same request
sent to that vLLM directly: /v1/responses (whole and streamed, raw and through
the openai SDK), /tokenize and /detokenize on the tiny Qwen2 chat model, and
/score, /v1/score, /rerank, /v1/rerank, /v2/rerank, /pooling and /classify on
a tiny cross-encoder served by vLLM's pooling runner (tools/tiny_pooling.py).
And the request's id: the one the client sent reaches vLLM's own log line.

Two vLLM processes for the module, both started by the catalog (min_replicas 1).
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from kscope.v1 import control_pb2
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

pytestmark = pytest.mark.vllm

API_KEY = "vllm-endpoints-key"
CHAT_MODEL = "tiny"
POOL_MODEL = "tiny-pool"
ENGINE_ARGS = vllm_cpu_args(512)
READY_TIMEOUT_S = 300
VOLATILE = frozenset({"id", "item_id", "created", "created_at"})
"""Fields that differ between any two answers (ids carry the request's id, which
KScope sets: the client's X-Request-Id or its own)."""


@pytest.fixture(scope="session")
def tiny_pooling(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Qwen2 cross-encoder (tools/tiny_pooling.py)."""
    out = tmp_path_factory.mktemp("models") / "tiny-pooling"
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "tiny_pooling.py"), str(out)],
        check=True, timeout=120,
    )  # fmt: skip
    return out


class System:
    def __init__(self, controller: Controller, facade: Facade, tmp: Path):
        self.controller = controller
        self.facade = facade
        self.tmp = tmp

    def instance(self, model: str) -> control_pb2.Instance:
        (ready,) = [
            i
            for i in self.controller.list_instances(model=model)
            if i.state == control_pb2.INSTANCE_STATE_READY
        ]
        return ready

    def engine_root(self, model: str) -> str:
        return self.instance(model).engine_url.removesuffix("/v1")

    def engine_key(self, model: str) -> str:
        return vllm_api_key(self.instance(model).id)

    def post(self, path: str, body: dict[str, Any], **headers: str) -> httpx.Response:
        """Through KScope."""
        return httpx.post(
            self.facade.base_url + path, json=body, timeout=60,
            headers={"Authorization": f"Bearer {API_KEY}", **headers},
        )  # fmt: skip

    def post_direct(self, model: str, path: str, body: dict[str, Any]) -> httpx.Response:
        """To the model's vLLM itself, with its key: the reference."""
        return httpx.post(
            self.engine_root(model) + path, json=body, timeout=60,
            headers={"Authorization": f"Bearer {self.engine_key(model)}"},
        )  # fmt: skip

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.facade.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=60
        )

    def direct(self, model: str) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.engine_root(model) + "/v1", api_key=self.engine_key(model),
            max_retries=0, timeout=60,
        )  # fmt: skip

    def agent_log(self, model: str) -> Path:
        """Where the local launcher writes the instance's agent output, vLLM's included."""
        return self.controller.state_dir / "logs" / f"{self.instance(model).id}.log"


def _ready(facade: Facade) -> bool:
    reply = httpx.get(
        f"{facade.base_url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5
    )
    states = {m["id"]: m["state"] for m in reply.json()["data"]}
    return states == {CHAT_MODEL: "ready", POOL_MODEL: "ready"}


@pytest.fixture(scope="module")
def system(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model: Path,
    tiny_pooling: Path,
    vllm_python: Path,
) -> Iterator[System]:
    tmp = tmp_path_factory.mktemp("vllm-endpoints")
    catalog = f"""
[[models]]
name = "{CHAT_MODEL}"
engine = "vllm"
model_path = "{tiny_model}"
min_replicas = 1
max_replicas = 1
expected_startup_s = 60
engine_args = {json.dumps([*ENGINE_ARGS, "--enable-log-requests"])}
env = {{ KSCOPE_VLLM_PYTHON = "{vllm_python}" }}

[[models]]
name = "{POOL_MODEL}"
engine = "vllm"
model_path = "{tiny_pooling}"
min_replicas = 1
max_replicas = 1
expected_startup_s = 60
engine_args = {json.dumps(ENGINE_ARGS)}
env = {{ KSCOPE_VLLM_PYTHON = "{vllm_python}", {agent_metrics_env(tmp / "pool-metrics.port")} }}
"""
    controller = start_controller(tmp, catalog)
    facade = start_facade(tmp, controller, api_key=API_KEY)
    try:
        wait_until(lambda: _ready(facade), READY_TIMEOUT_S, 0.5, what="both vLLMs ready")
        yield System(controller, facade, tmp)
    finally:
        facade.proc.stop()
        controller.proc.stop(grace_s=40)
        stop_instances_left_behind(controller.state_dir)


def _stable(value: Any) -> Any:
    """`value` without the fields that differ between any two answers."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _same_answer(ours: httpx.Response, theirs: httpx.Response) -> None:
    assert ours.status_code == theirs.status_code, (ours.text, theirs.text)
    assert _stable(ours.json()) == _stable(theirs.json())


# ---------------------------------------------------------------- /v1/responses

RESPONSE_REQUEST: dict[str, Any] = {
    "model": CHAT_MODEL, "input": "Name a fox.", "max_output_tokens": 8, "temperature": 0,
}  # fmt: skip


def test_a_response_matches_vllm_directly(system: System) -> None:
    ours = system.post("/v1/responses", RESPONSE_REQUEST)
    _same_answer(ours, system.post_direct(CHAT_MODEL, "/v1/responses", RESPONSE_REQUEST))
    assert ours.json()["usage"]["output_tokens"] == 8


def test_a_response_through_the_sdk(system: System) -> None:
    params: dict[str, Any] = {"input": "Name a fox.", "max_output_tokens": 8, "temperature": 0}
    ours = system.client().responses.create(model=CHAT_MODEL, **params)
    theirs = system.direct(CHAT_MODEL).responses.create(model=CHAT_MODEL, **params)
    assert ours.output_text == theirs.output_text != ""
    assert ours.usage == theirs.usage
    assert ours.usage is not None and ours.usage.output_tokens == 8


def _events(reply: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    """A stream's events as (the `event:` name, the data), from the raw lines."""
    events = []
    for block in reply.text.split("\n\n"):
        if not block:
            continue
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((lines["event"], json.loads(lines["data"])))
    return events


DELTA = "response.output_text.delta"


def _comparable(events: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, Any]]:
    """Events as (name, data less ids, timestamps and sequence numbers), each run
    of text deltas merged into one: on loaded cores vLLM coalesces tokens into
    fewer deltas, so their number differs between any two streams."""
    merged: list[tuple[str, Any]] = []
    for name, data in events:
        stable = {k: v for k, v in _stable(data).items() if k != "sequence_number"}
        if name == DELTA and merged and merged[-1][0] == DELTA:
            merged[-1][1]["delta"] += stable["delta"]
            continue
        merged.append((name, stable))
    return merged


def test_a_streamed_response_passes_every_event_as_vllm_sent_it(system: System) -> None:
    body = {**RESPONSE_REQUEST, "stream": True}
    ours = system.post("/v1/responses", body)
    theirs = system.post_direct(CHAT_MODEL, "/v1/responses", body)
    assert ours.status_code == theirs.status_code == 200
    assert ours.headers["content-type"].startswith("text/event-stream")
    ours_events = _events(ours)  # each event exactly an `event:` line and a `data:` line
    assert [name for name, _ in ours_events][:2] == ["response.created", "response.in_progress"]
    assert ours_events[-1][0] == "response.completed"
    # Not one event lost, doubled or reordered on the way.
    assert [d["sequence_number"] for _, d in ours_events] == list(range(len(ours_events)))
    assert _comparable(ours_events) == _comparable(_events(theirs))
    assert "[DONE]" not in ours.text  # the Responses API has none, and nor do we


def _types(events: list[Any]) -> list[str]:
    """The events' types, each run of text deltas as one."""
    types: list[str] = []
    for event in events:
        if not (event.type == DELTA and types and types[-1] == DELTA):
            types.append(event.type)
    return types


def test_a_streamed_response_through_the_sdk(system: System) -> None:
    params: dict[str, Any] = {"input": "Name a fox.", "max_output_tokens": 6, "temperature": 0}
    ours = list(system.client().responses.create(model=CHAT_MODEL, stream=True, **params))
    theirs = list(
        system.direct(CHAT_MODEL).responses.create(model=CHAT_MODEL, stream=True, **params)
    )
    assert _types(ours) == _types(theirs)
    deltas = [e.delta for e in ours if e.type == DELTA]
    assert len(deltas) >= 1
    assert "".join(deltas) == "".join(e.delta for e in theirs if e.type == DELTA)
    completed = ours[-1]
    assert completed.type == "response.completed"
    assert completed.response.usage is not None
    assert completed.response.usage.output_tokens == 6


def test_a_response_the_engine_refuses_is_refused_as_vllm_said(system: System) -> None:
    bad = {**RESPONSE_REQUEST, "max_output_tokens": "eight"}
    ours = system.post("/v1/responses", bad)
    _same_answer(ours, system.post_direct(CHAT_MODEL, "/v1/responses", bad))
    assert ours.status_code == 400


# ---------------------------------------------------------------- /tokenize, /detokenize


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/tokenize", {"prompt": "The quick brown fox"}),
        ("/tokenize", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/detokenize", {"tokens": [404, 1189, 613, 1110]}),
        ("/detokenize", {"tokens": "many"}),
    ],
    ids=["prompt", "messages", "tokens", "bad-tokens"],
)
def test_tokenize_and_detokenize_match_vllm_directly(
    system: System, path: str, body: dict[str, Any]
) -> None:
    request = {"model": CHAT_MODEL, **body}
    ours = system.post(path, request)
    _same_answer(ours, system.post_direct(CHAT_MODEL, path, request))


def test_tokens_round_trip(system: System) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    tokens = system.post("/tokenize", {"model": CHAT_MODEL, "prompt": text}).json()["tokens"]
    back = system.post("/detokenize", {"model": CHAT_MODEL, "tokens": tokens}).json()
    assert back == {"prompt": text}


# ---------------------------------------------------------------- the pooling model

QUERY = "what is a fox"
DOCUMENTS = ["a fox is an animal", "the sky is blue", "foxes live in dens"]
POOLING_REQUESTS = [
    ("/score", {"queries": QUERY, "documents": DOCUMENTS}),
    ("/v1/score", {"queries": QUERY, "documents": DOCUMENTS}),
    ("/rerank", {"query": QUERY, "documents": DOCUMENTS}),
    ("/v1/rerank", {"query": QUERY, "documents": DOCUMENTS, "top_n": 2}),
    ("/v2/rerank", {"query": QUERY, "documents": DOCUMENTS}),
    ("/pooling", {"input": DOCUMENTS}),
    ("/classify", {"input": DOCUMENTS}),
    ("/classify", {"input": 42}),
]


@pytest.mark.parametrize(
    ("path", "body"), POOLING_REQUESTS, ids=[p for p, _ in POOLING_REQUESTS[:-1]] + ["bad"]
)
def test_the_pooling_endpoints_match_vllm_directly(
    system: System, path: str, body: dict[str, Any]
) -> None:
    request = {"model": POOL_MODEL, **body}
    ours = system.post(path, request)
    _same_answer(ours, system.post_direct(POOL_MODEL, path, request))
    if body["input" if "input" in body else "documents"] != 42:
        assert ours.status_code == 200
        assert ours.json()["usage"]["prompt_tokens"] > 0


def test_the_pooling_model_says_what_its_engine_serves(system: System) -> None:
    # Learned from the running vLLM (its /openapi.json): no --runner was given.
    reply = httpx.get(f"{system.facade.base_url}/v1/models",
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)  # fmt: skip
    caps = next(m for m in reply.json()["data"] if m["id"] == POOL_MODEL)["capabilities"]
    assert (caps["engine"], caps["runner"]) == ("vllm", "pooling")
    assert {"score", "rerank", "classify", "pooling"} <= set(caps["endpoints"])
    assert "chat_completions" not in caps["endpoints"]


def test_a_chat_request_to_the_pooling_model_is_refused_before_routing(system: System) -> None:
    port_file = system.tmp / "pool-metrics.port"
    before = agent_requests(port_file, POOL_MODEL)
    hi = [{"role": "user", "content": "hi"}]
    reply = system.post("/v1/chat/completions", {"model": POOL_MODEL, "messages": hi})
    assert reply.status_code == 404, reply.text
    assert reply.json()["error"]["message"] == (
        f"model '{POOL_MODEL}' does not offer /v1/chat/completions"
    )
    assert agent_requests(port_file, POOL_MODEL) == before  # no agent saw it
    assert_agent_counts(port_file, POOL_MODEL, lambda: system.post(
        "/classify", {"model": POOL_MODEL, "input": DOCUMENTS}).raise_for_status())  # fmt: skip


def test_an_endpoint_the_engine_lacks_is_an_openai_shaped_404(system: System) -> None:
    request = {"model": CHAT_MODEL, "input": DOCUMENTS}
    ours = system.post("/classify", request)
    theirs = system.post_direct(CHAT_MODEL, "/classify", request)
    assert ours.status_code == theirs.status_code == 404
    assert set(ours.json()["error"]) == {"message", "type", "param", "code"}


# ---------------------------------------------------------------- the request's id


def _logged(system: System, model: str, needle: str) -> bool:
    return needle in system.agent_log(model).read_text(errors="replace")


def test_the_clients_request_id_reaches_vllms_own_log(system: System) -> None:
    rid = f"e2e-{uuid.uuid4().hex}"
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    reply = system.post("/v1/chat/completions", body, **{"X-Request-Id": rid})
    assert reply.status_code == 200
    assert reply.headers["x-request-id"] == rid
    assert reply.json()["id"] == f"chatcmpl-{rid}"  # vLLM named the request by it
    # vLLM's request logger (--enable-log-requests) prints the id it was given.
    wait_until(lambda: _logged(system, CHAT_MODEL, f"Received request chatcmpl-{rid}"), 5,
               what="vLLM logged the request id")  # fmt: skip


def test_kscopes_own_request_id_reaches_vllm_too(system: System) -> None:
    reply = system.post("/v1/completions", {"model": CHAT_MODEL, "prompt": "x", "max_tokens": 1})
    assert reply.status_code == 200
    rid = reply.headers["x-request-id"]
    assert rid.startswith("req-")
    assert reply.json()["id"] == f"cmpl-{rid}"
    wait_until(lambda: _logged(system, CHAT_MODEL, f"Received request cmpl-{rid}"), 5,
               what="vLLM logged the request id")  # fmt: skip
