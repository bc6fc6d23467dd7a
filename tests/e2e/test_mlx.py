"""Real MLX-VLM (mlx[cpu]) behind the whole gateway: the openai SDK → facade →
agent → the in-process mlx_vlm engine, on a tiny random-weight Qwen2-VL that
tools/tiny_vlm.py builds offline. Images come from a data: URL or from an HTTP
server this module runs.

Two facades share one controller (the multiplexed stream and one gRPC call per
request), so the queue is checked on both of the agent's request paths.
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionContentPartParam

from tests.procs import (
    ROOT,
    Controller,
    Facade,
    Proc,
    start_controller,
    start_facade,
    stop_instances_left_behind,
    wait_until,
)

pytestmark = pytest.mark.mlx

MODEL = "tiny-vlm"
FAST_TIMEOUT = "tiny-vlm-fast-timeout"
"""The same weights with a 1 s queue timeout, for the queue-timeout test."""
LONG = 1000
"""max_tokens of a long request: two to four seconds here."""


# --- images ------------------------------------------------------------------------------


def _png(pattern: str, size: tuple[int, int] = (64, 64)) -> bytes:
    from PIL import Image

    if pattern == "noise":  # incompressible: a large file from few pixels
        import numpy as np

        pixels = np.random.default_rng(0).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
    else:
        image = Image.new("RGB", size, pattern)
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def data_url(color: str) -> str:
    return "data:image/png;base64," + base64.b64encode(_png(color)).decode()


class ImageServer:
    """Serves test images over HTTP: /<color>.png, and a few bad ones."""

    def __init__(self) -> None:
        pages: dict[str, tuple[str, bytes]] = {
            "/red.png": ("image/png", _png("red")),
            "/blue.png": ("image/png", _png("blue")),
            "/green.png": ("image/png", _png("green")),
            "/page.html": ("text/html", b"<html>not an image</html>"),
            "/fake.png": ("image/png", b"these bytes are no PNG"),
            "/big.png": ("image/png", _png("noise", (400, 400))),
        }

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/slow.png":
                    time.sleep(3)
                content_type, body = pages.get(self.path, ("image/png", _png("white")))
                if self.path == "/missing.png":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- the system --------------------------------------------------------------------------


class System:
    def __init__(self, controller: Controller, facades: dict[str, Facade], images: ImageServer):
        self.controller = controller
        self.facades = facades
        self.images = images

    def client(self, transport: str = "multiplex", **options: Any) -> openai.OpenAI:
        kw: dict[str, Any] = {"max_retries": 0, "timeout": 120, **options}
        return openai.OpenAI(
            base_url=f"{self.facades[transport].base_url}/v1", api_key="unused", **kw
        )

    def stats(self, transport: str = "multiplex") -> dict[str, Any]:
        reply = httpx.get(f"{self.facades[transport].base_url}/v1/queue/stats", timeout=10)
        reply.raise_for_status()
        body: dict[str, Any] = reply.json()
        return body

    def chat(self, content: Any, transport: str = "multiplex", **params: Any) -> Any:
        return self.client(transport).chat.completions.create(
            model=params.pop("model", MODEL),
            messages=[{"role": "user", "content": content}],
            **{"max_tokens": 24, "temperature": 0, **params},
        )


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory, tiny_vlm: Path) -> Iterator[System]:
    tmp = tmp_path_factory.mktemp("mlx")
    images = ImageServer()
    env = '{ KSCOPE_IMAGE_FETCH_TIMEOUT_S = "1", KSCOPE_IMAGE_MAX_BYTES = "200000" }'
    catalog = f"""
[[models]]
name = "{MODEL}"
engine = "mlx_vlm"
model_path = "{tiny_vlm}"
min_replicas = 1
max_concurrency = 1
queue_size = 2
queue_timeout_s = 60
expected_startup_s = 5
env = {env}

[[models]]
name = "{FAST_TIMEOUT}"
engine = "mlx_vlm"
model_path = "{tiny_vlm}"
min_replicas = 1
queue_timeout_s = 1
expected_startup_s = 5
"""
    controller = start_controller(tmp, catalog)
    facades: dict[str, Facade] = {}
    try:
        facades["multiplex"] = start_facade(tmp, controller)
        facades["per-call"] = start_facade(tmp, controller, name="facade-per-call", multiplex=False)
        sys_ = System(controller, facades, images)
        for name in (MODEL, FAST_TIMEOUT):
            wait_until(
                lambda n=name: sys_.stats()["queue_stats"][n]["running"],
                60,
                0.2,
                what=f"{name} ready",
            )
        yield sys_
    finally:
        for facade in facades.values():
            facade.proc.stop()
        controller.proc.stop()
        stop_instances_left_behind(controller.state_dir)
        images.close()


def _text(reply: Any) -> str:
    text: str = reply.choices[0].message.content
    return text


def _ask(
    image_url: str, question: str = "What is in this image?"
) -> list[ChatCompletionContentPartParam]:
    return [
        {"type": "text", "text": question},
        {"type": "image_url", "image_url": {"url": image_url}},
    ]


# --- the engine through the gateway ------------------------------------------------------


def test_image_and_text_from_a_data_url_and_an_http_url(system: System) -> None:
    text_only = system.chat("What is in this image?")
    from_data = system.chat(_ask(data_url("red")))
    from_http = system.chat(_ask(system.images.url("/red.png")))
    assert _text(from_data) and from_data.choices[0].finish_reason == "length"
    # The same pixels, inline or fetched, give the same greedy answer.
    assert _text(from_http) == _text(from_data)
    # The image really is in the prompt: its tokens are counted.
    assert from_data.usage is not None and text_only.usage is not None
    assert from_data.usage.prompt_tokens > text_only.usage.prompt_tokens + 2
    assert from_data.usage.completion_tokens == 24
    assert from_data.model == MODEL and from_data.id.startswith("chatcmpl-")


def test_two_images_give_different_greedy_outputs(system: System) -> None:
    red = _text(system.chat(_ask(data_url("red"))))
    blue = _text(system.chat(_ask(data_url("blue"))))
    assert red != blue
    both = system.chat([*_ask(data_url("red")), *_ask(data_url("blue"), "and this one?")])
    assert both.usage is not None
    assert _text(both) not in (red, blue)


def test_multi_turn_with_an_image_in_turn_one(system: System) -> None:
    def conversation(color: str) -> str:
        messages: list[Any] = [
            {"role": "system", "content": "You describe images."},
            {"role": "user", "content": _ask(system.images.url(f"/{color}.png"))},
            {"role": "assistant", "content": "A square of one colour."},
            {"role": "user", "content": "Which colour?"},
        ]
        reply = system.client().chat.completions.create(
            model=MODEL, messages=messages, max_tokens=24, temperature=0
        )
        return _text(reply)

    # The turn-one image still steers the answer to the last turn.
    assert conversation("red") != conversation("green")


def test_text_only_and_determinism_at_temperature_zero(system: System) -> None:
    first = system.chat("Tell me a story.", max_tokens=40)
    again = system.chat("Tell me a story.", max_tokens=40)
    assert _text(first) == _text(again)
    assert first.usage is not None and first.usage.completion_tokens == 40
    assert first.usage.total_tokens == first.usage.prompt_tokens + 40


def test_streaming_is_incremental_and_matches_the_whole_answer(system: System) -> None:
    whole = _text(system.chat(_ask(data_url("blue")), max_tokens=60))
    stream = system.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": _ask(data_url("blue"))}],
        max_tokens=60,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    arrivals: list[float] = []
    pieces: list[str] = []
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
            arrivals.append(time.monotonic())
    assert "".join(pieces) == whole
    assert len(pieces) >= 30, "tokens should arrive one by one, not in one piece"
    assert arrivals[-1] - arrivals[0] > 0.01
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 60


def test_stop_seed_and_sampling_parameters(system: System) -> None:
    full = _text(system.chat("Hello", max_tokens=40))
    stop = full[12:16]
    cut = system.chat("Hello", max_tokens=40, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert _text(cut) == full[: full.index(stop)]
    sampled = [
        _text(system.chat("Hello", temperature=1.0, top_p=0.9, seed=seed, max_tokens=30))
        for seed in (1, 1, 2)
    ]
    assert sampled[0] == sampled[1] != sampled[2]


@pytest.mark.parametrize(
    ("content", "params", "needle"),
    [
        ("remote-missing", {}, "HTTP 404"),
        ("remote-html", {}, "not an image"),
        ("remote-fake", {}, "cannot be decoded"),
        ("remote-big", {}, "larger than"),
        ("remote-slow", {}, "no answer within"),
        ("data-bad", {}, "invalid base64"),
        (
            "text",
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
            "tool calling",
        ),
        ("text", {"n": 2}, "'n' other than 1"),
        ("text", {"logprobs": True}, "logprobs"),
        ("text", {"extra_body": {"guided_json": {}}}, "'guided_json'"),
    ],
)
def test_what_cannot_be_served_is_a_clear_400(
    system: System, content: str, params: dict[str, Any], needle: str
) -> None:
    urls = {
        "remote-missing": system.images.url("/missing.png"),
        "remote-html": system.images.url("/page.html"),
        "remote-fake": system.images.url("/fake.png"),
        "remote-big": system.images.url("/big.png"),
        "remote-slow": system.images.url("/slow.png"),
        "data-bad": "data:image/png;base64,@@@",
    }
    body = _ask(urls[content]) if content in urls else "hi"
    with pytest.raises(openai.BadRequestError) as info:
        system.chat(body, **params)
    assert needle in info.value.message
    error = info.value.body
    assert isinstance(error, dict) and error["type"] == "invalid_request_error"


# --- the queue ---------------------------------------------------------------------------


def _long_request(system: System, transport: str, tag: int) -> Callable[[], str]:
    def run() -> str:
        messages = [{"role": "user", "content": f"request {tag}"}]
        params: dict[str, Any] = {"model": MODEL, "max_tokens": LONG, "messages": messages}
        client = system.client(transport)
        try:
            if tag % 2:  # streaming requests queue like the others
                chunks = list(client.chat.completions.create(**params, stream=True))
                return f"ok {chunks[0].id}"
            return f"ok {client.chat.completions.create(**params).id}"
        except openai.RateLimitError as exc:
            assert isinstance(exc.body, dict) and exc.body["code"] == "queue_full"
            return "429"

    return run


@pytest.mark.parametrize("transport", ["multiplex", "per-call"])
def test_five_long_requests_one_runs_two_wait_two_get_429(system: System, transport: str) -> None:
    seen: list[tuple[int, int]] = []
    with ThreadPoolExecutor(5) as pool:
        futures = [pool.submit(_long_request(system, transport, i)) for i in range(5)]

        def busy() -> bool:
            stats = system.stats(transport)["queue_stats"][MODEL]
            seen.append((stats["active_requests"], stats["queue_size"]))
            return seen[-1] == (1, 2)

        # While they run, the stats show one active and two waiting.
        wait_until(busy, 10, 0.1, what=f"stats show 1 active, 2 queued (saw {seen[-3:]})")
        outcomes = [f.result(timeout=120) for f in futures]
    assert sorted(o.split()[0] for o in outcomes) == ["429", "429", "ok", "ok", "ok"]
    ids = [o.split()[1] for o in outcomes if o != "429"]
    assert len(set(ids)) == 3  # none lost, none answered twice
    stats = system.stats(transport)["queue_stats"][MODEL]
    assert (stats["max_concurrency"], stats["max_queue_size"]) == (1, 2)
    instance = next(iter(stats["instances"].values()))
    assert instance["state"] == "ready" and instance["max_concurrency"] == 1
    wait_until(
        lambda: system.stats(transport)["queue_stats"][MODEL]["active_requests"] == 0,
        5,
        0.1,
        what="queue empty again",
    )


def test_a_queued_request_past_the_queue_timeout_gets_504(system: System) -> None:
    client = system.client()
    holder = client.chat.completions.create(
        model=FAST_TIMEOUT,
        messages=[{"role": "user", "content": "hold"}],
        max_tokens=20_000,
        stream=True,
    )
    next(iter(holder))  # running now
    started = time.monotonic()
    try:
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(
                model=FAST_TIMEOUT, messages=[{"role": "user", "content": "wait"}], max_tokens=5
            )
    finally:
        holder.close()
    waited = time.monotonic() - started
    assert info.value.status_code == 504
    error = info.value.body
    assert isinstance(error, dict)
    assert (error["type"], error["code"]) == ("timeout_error", "queue_timeout")
    assert 0.9 < waited < 5


@pytest.mark.parametrize("transport", ["multiplex", "per-call"])
def test_a_client_that_disconnects_frees_its_slot_at_once(system: System, transport: str) -> None:
    url = f"{system.facades[transport].base_url}/v1/chat/completions"
    body = {
        "model": MODEL,
        "stream": True,
        "max_tokens": 50_000,
        "messages": [{"role": "user", "content": "a very long answer"}],
    }
    with httpx.stream("POST", url, json=body, timeout=30) as reply:
        assert reply.status_code == 200
        for n, _ in enumerate(reply.iter_lines()):
            if n > 10:
                break  # leaving the block closes the connection mid-stream
    # 50,000 tokens would take minutes; the next request gets the one slot at once,
    # because the engine stopped at its next token.
    started = time.monotonic()
    reply = system.chat("next", transport=transport, max_tokens=5)
    assert _text(reply) and time.monotonic() - started < 3
    wait_until(
        lambda: system.stats(transport)["queue_stats"][MODEL]["active_requests"] == 0,
        5,
        0.1,
        what="no request left running",
    )


# --- kscope serve and the original README's examples ------------------------------------

_URL = re.compile(r'"url": "https?://[^"]+"')


def _readme_examples(image_url: str) -> dict[str, dict[str, Any]]:
    """The request bodies of docs/mlx.md's copies of the original README's
    examples, with only the image URLs pointing at the local image server."""
    text = (ROOT / "docs" / "mlx.md").read_text()
    curl_bodies = re.findall(r"-d '(\{.*?\})'", text, re.S)
    multi_turn = re.search(r"### Multi-turn Conversations.*?```json\n(.*?)```", text, re.S)
    assert len(curl_bodies) == 2 and multi_turn is not None
    bodies = [*curl_bodies, multi_turn.group(1)]
    local = [json.loads(_URL.sub(f'"url": "{image_url}"', b)) for b in bodies]
    return dict(zip(["vision", "streaming", "multi-turn"], local, strict=True))


def _idle(base: str) -> bool:
    (stats,) = httpx.get(f"{base}/v1/queue/stats", timeout=5).json()["queue_stats"].values()
    return (stats["queue_size"], stats["active_requests"]) == (0, 0)


def test_kscope_serve_answers_the_original_readme_examples(
    tmp_path: Path, tiny_vlm: Path, system: System
) -> None:
    proc = Proc(
        [
            str(Path(sys.executable).parent / "kscope"),
            "serve",
            "--model-path",
            str(tiny_vlm),
            "--model-type",
            "mlx_vlm",
            "--max-concurrency",
            "1",
            "--queue-timeout",
            "300",
            "--queue-size",
            "100",
            "--port",
            "0",
            "--controller-port",
            "0",
            "--state-dir",
            str(tmp_path / "state"),
        ],
        tmp_path / "serve.log",
    )
    try:
        base = ""

        def announced() -> bool:
            nonlocal base
            found = re.search(r"KScope is up: (http://\S+)/v1", proc.log())
            assert proc.alive(), proc.log()[-3000:]
            base = found.group(1) if found else ""
            return bool(base)

        wait_until(announced, 30, 0.1, what="kscope serve announced its URL")

        def ready() -> bool:
            stats = httpx.get(f"{base}/v1/queue/stats", timeout=5)
            return stats.status_code == 200 and any(
                m["running"] for m in stats.json()["queue_stats"].values()
            )

        wait_until(ready, 60, 0.2, what="the model is ready")
        examples = _readme_examples(system.images.url("/red.png"))
        url = f"{base}/v1/chat/completions"
        headers = {"Content-Type": "application/json"}

        vision = httpx.post(
            url, content=json.dumps(examples["vision"]), headers=headers, timeout=60
        )
        assert vision.status_code == 200, vision.text
        answer = vision.json()
        assert answer["object"] == "chat.completion"
        assert answer["choices"][0]["message"]["role"] == "assistant"
        assert answer["choices"][0]["finish_reason"] in ("stop", "length")

        with httpx.stream(
            "POST", url, content=json.dumps(examples["streaming"]), headers=headers, timeout=60
        ) as streamed:
            assert streamed.status_code == 200
            assert streamed.headers["content-type"].startswith("text/event-stream")
            events = [line for line in streamed.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[6:]) for e in events[:-1]]
        assert len(chunks) > 3
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)

        turn = httpx.post(
            url, content=json.dumps(examples["multi-turn"]), headers=headers, timeout=60
        )
        assert turn.status_code == 200, turn.text
        assert turn.json()["choices"][0]["message"]["content"]

        stats = httpx.get(f"{base}/v1/queue/stats", timeout=5).json()
        assert stats["status"] == "ok"
        (model_stats,) = stats["queue_stats"].values()
        assert (model_stats["max_concurrency"], model_stats["max_queue_size"]) == (1, 100)
        # Load reports arrive every second: the last request may still show for one.
        wait_until(lambda: _idle(base), 5, 0.1, what="kscope serve's queue is idle")
    finally:
        proc.stop()
