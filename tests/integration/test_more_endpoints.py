"""The endpoints beyond chat, completions and embeddings, with real processes:
controller, facades and agents (the `openai` engine) in front of
bench/upstream.py, over both transports between facade and agent.

Audio uploads are multipart/form-data: the openai SDK sends a real one, and
the upstream (Starlette's multipart parser, an independent reader) echoes what
arrived: the body's digest, its Content-Type, every field and each file's
size and digest. The paths outside /v1 (vLLM's /tokenize, /rerank …) are
checked here for keys and for where they land on the engine; what vLLM
answers on each is in tests/e2e/test_vllm_endpoints.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai.types.audio import TranscriptionTextDoneEvent
from pydantic import BaseModel

from tests.procs import (
    Controller,
    Facade,
    start_controller,
    start_facade,
    start_upstream,
    stop_instances_left_behind,
    wait_until,
)

API_KEY = "test-key-audio"
TRANSPORTS = ("multiplex", "per-call")
# Bytes any re-encoding would change: every byte value, CRLFs and a near miss of
# a multipart delimiter.
AUDIO = bytes(range(256)) * 64 + b"\r\n--\r\n\r\n--boundary" + bytes(range(255, -1, -1))


@dataclass
class Gateway:
    controller: Controller
    facades: dict[str, Facade] = field(default_factory=dict)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("endpoints")
    upstream = start_upstream(tmp)
    catalog = f"""
[[models]]
name = "whisper"
engine = "openai"
upstream_url = "{upstream.url}"
min_replicas = 1
expected_startup_s = 3

[[models]]
name = "whisper-renamed"
engine = "openai"
upstream_url = "{upstream.url}"
upstream_model = "whisper-large"
min_replicas = 1
expected_startup_s = 3
"""
    controller = start_controller(tmp, catalog)
    gateway = Gateway(controller)
    try:
        for transport in TRANSPORTS:
            gateway.facades[transport] = start_facade(
                tmp, controller, api_key=API_KEY, name=f"facade-{transport}",
                multiplex=transport == "multiplex",
            )  # fmt: skip
        for facade in gateway.facades.values():
            wait_until(lambda f=facade: _ready(f), 30, what="models ready")
        yield gateway
    finally:
        for facade in gateway.facades.values():
            facade.proc.stop()
        controller.proc.stop()
        stop_instances_left_behind(controller.state_dir)
        upstream.proc.stop()


@pytest.fixture(params=TRANSPORTS)
def facade(request: pytest.FixtureRequest, gateway: Gateway) -> Facade:
    return gateway.facades[request.param]


def _ready(facade: Facade) -> bool:
    reply = httpx.get(
        f"{facade.base_url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5
    )
    states = {m["id"]: m["state"] for m in reply.json()["data"]}
    return states == {"whisper": "ready", "whisper-renamed": "ready"}


class Recorder:
    """What the SDK put on the wire (an httpx event hook): the Content-Type
    (with its boundary) and the body of its last request."""

    def __init__(self) -> None:
        self.content_type = ""
        self.body = b""

    def __call__(self, request: Any) -> None:
        self.content_type = request.headers["content-type"]
        self.body = request.read()


def _client(facade: Facade, recorder: Recorder | None = None) -> openai.OpenAI:
    hooks: dict[str, list[Callable[..., Any]]] = {"request": [recorder]} if recorder else {}
    return openai.OpenAI(
        base_url=f"{facade.base_url}/v1", api_key=API_KEY, max_retries=0,
        http_client=openai.DefaultHttpxClient(timeout=30, event_hooks=hooks),
    )  # fmt: skip


def _echo(answer: BaseModel) -> dict[str, Any]:
    """What the upstream says arrived (its `kscope_echo`, a field the SDK does not know)."""
    assert answer.model_extra is not None
    echo: dict[str, Any] = answer.model_extra["kscope_echo"]
    return echo


@pytest.mark.parametrize("task", ["transcriptions", "translations"])
def test_an_sdk_upload_reaches_the_engine_byte_for_byte(facade: Facade, task: str) -> None:
    recorder = Recorder()
    audio = getattr(_client(facade, recorder).audio, task)
    extra = {"language": "en"} if task == "transcriptions" else {}
    reply = audio.create(
        model="whisper", file=("clip.wav", AUDIO, "audio/wav"), temperature=0.5, **extra
    )
    echo = _echo(reply)
    assert recorder.content_type.startswith("multipart/form-data; boundary=")
    # The bytes the SDK sent and its Content-Type, boundary and all, unchanged.
    assert echo["sha256"] == hashlib.sha256(recorder.body).hexdigest()
    assert echo["content_type"] == recorder.content_type
    assert echo["task"] == task
    assert echo["fields"] == {"model": "whisper", "temperature": "0.5", **extra}
    assert echo["files"] == [
        {"field": "file", "filename": "clip.wav", "content_type": "audio/wav",
         "size": len(AUDIO), "sha256": hashlib.sha256(AUDIO).hexdigest()}
    ]  # fmt: skip
    assert reply.text == f"{task} of clip.wav"


def test_a_renamed_model_is_renamed_in_the_form_and_nothing_else(facade: Facade) -> None:
    recorder = Recorder()
    reply = _client(facade, recorder).audio.transcriptions.create(
        model="whisper-renamed", file=("a.wav", AUDIO, "audio/wav")
    )
    echo = _echo(reply)
    assert echo["fields"] == {"model": "whisper-large"}
    renamed = recorder.body.replace(b"\r\n\r\nwhisper-renamed\r\n", b"\r\n\r\nwhisper-large\r\n")
    assert (
        echo["sha256"]
        == hashlib.sha256(renamed).hexdigest()
        != hashlib.sha256(recorder.body).hexdigest()
    )
    assert echo["files"][0]["sha256"] == hashlib.sha256(AUDIO).hexdigest()


@pytest.mark.parametrize(
    ("response_format", "media"), [("text", "text/plain; charset=utf-8"), ("vtt", "text/vtt")]
)
def test_a_text_transcription_keeps_the_engines_content_type(
    facade: Facade, response_format: str, media: str
) -> None:
    # The SDK returns the text as it came (its type for these formats is str).
    audio: Any = _client(facade).audio  # the SDK's overloads want the format as a literal
    text = audio.transcriptions.create(
        model="whisper", file=("t.wav", AUDIO, "audio/wav"), response_format=response_format
    )
    assert text == "transcriptions of t.wav\n"
    reply = httpx.post(
        f"{facade.base_url}/v1/audio/transcriptions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        data={"model": "whisper", "response_format": response_format},
        files={"file": ("t.wav", AUDIO, "audio/wav")},
        timeout=30,
    )
    assert reply.status_code == 200
    assert reply.headers["content-type"] == media
    assert reply.headers["x-request-id"]
    assert reply.content == b"transcriptions of t.wav\n"


def test_a_streamed_transcription(facade: Facade) -> None:
    stream = _client(facade).audio.transcriptions.create(
        model="whisper", file=("s.wav", AUDIO, "audio/wav"), stream=True
    )
    events = list(stream)
    assert [e.type for e in events] == ["transcript.text.delta", "transcript.text.done"]
    done = events[-1]
    assert isinstance(done, TranscriptionTextDoneEvent)
    assert done.text == "transcriptions of s.wav"
    assert _echo(done)["fields"] == {
        "model": "whisper",
        "stream": "true",
    }


def test_an_upload_for_an_unknown_model_is_the_gateways_404(gateway: Gateway) -> None:
    facade = gateway.facades["multiplex"]
    with pytest.raises(openai.NotFoundError) as info:
        _client(facade).audio.transcriptions.create(
            model="no-such-model", file=("a.wav", AUDIO, "audio/wav")
        )
    error = info.value.body
    assert isinstance(error, dict)
    assert (error["code"], error["param"]) == ("model_not_found", "model")


def test_an_unknown_model_id_is_a_clean_404(gateway: Gateway) -> None:
    # Raised through FastAPI's handlers like every other ApiError, and logged as
    # nothing worse (Starlette clears a raised error's __traceback__).
    facade = gateway.facades["multiplex"]
    with pytest.raises(openai.NotFoundError) as info:
        _client(facade).models.retrieve("no-such-model")
    error = info.value.body
    assert isinstance(error, dict)
    assert (error["code"], error["param"]) == ("model_not_found", "model")
    assert _client(facade).models.retrieve("whisper").id == "whisper"
    assert "Traceback" not in facade.proc.log()


def test_an_upload_that_is_not_multipart_is_400(gateway: Gateway) -> None:
    facade = gateway.facades["multiplex"]
    reply = httpx.post(
        f"{facade.base_url}/v1/audio/transcriptions",
        json={"model": "whisper"},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=10,
    )
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] == "invalid_content_type"


@pytest.mark.parametrize("path", ["/tokenize", "/detokenize", "/pooling", "/classify",
                                  "/score", "/rerank", "/v2/rerank"])  # fmt: skip
def test_a_path_outside_v1_needs_a_key_and_lands_at_the_engines_root(
    facade: Facade, path: str
) -> None:
    url = f"{facade.base_url}{path}"
    body = {"model": "whisper", "prompt": "x"}
    keyless = httpx.post(url, json=body, timeout=10)
    assert keyless.status_code == 401
    assert keyless.json()["error"]["code"] == "missing_api_key"
    assert keyless.headers["x-request-id"]
    # The upstream (URL …/v1) has no such route: its own 404 names the path it
    # got, the engine's root and not under /v1.
    reply = httpx.post(url, json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
    assert reply.status_code == 404
    assert reply.json()["error"]["message"] == f"no route POST {path}"


def test_v1_paths_land_under_the_engines_v1(gateway: Gateway) -> None:
    facade = gateway.facades["per-call"]
    for path in ("/v1/responses", "/v1/score", "/v1/rerank"):
        reply = httpx.post(
            f"{facade.base_url}{path}",
            content=orjson.dumps({"model": "whisper", "input": "x"}),
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
            timeout=10,
        )
        assert reply.status_code == 404
        assert reply.json()["error"]["message"] == f"no route POST {path}"
