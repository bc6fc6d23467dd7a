"""Usage per key and limits per key and owner, with real processes: a
controller, two facades and an agent in front of the fake upstream (whose
token counts are known: prompt = len(JSON of the messages) // 4, completion =
max_tokens). Requests go through the official `openai` SDK (no retries, so a
429 is seen as it is) or httpx where headers are read."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam

from kscope.v1 import control_pb2, keys_pb2, keys_pb2_grpc
from tests.procs import (
    Controller,
    Facade,
    one_model_stack,
    restart_controller,
    run_kscope,
    start_controller,
    start_facade,
    start_upstream,
    stop_instances_left_behind,
    wait_until,
)

pytestmark = pytest.mark.quota

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
PROMPT_TOKENS = max(1, len(orjson.dumps(HI)) // 4)
"""What the fake upstream counts for HI (bench/upstream.py)."""
CATALOG = """
[[models]]
name = "one"
engine = "openai"
upstream_url = "{fast}"
min_replicas = 1

[[models]]
name = "slow"
engine = "openai"
upstream_url = "{slow}"
min_replicas = 1

[[models]]
name = "capped"
engine = "openai"
upstream_url = "{fast}"
min_replicas = 1
[models.key_limits]
requests_per_minute = 2
"""


@dataclass
class Stack:
    tmp: Path
    controller: Controller
    facades: list[Facade]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("usage")
    fast = start_upstream(tmp, name="fast")
    # Streams that last: 20 tokens, 100 ms apart.
    slow = start_upstream(tmp, "--token-interval-ms", "100", name="slow")
    controller = start_controller(tmp, CATALOG.format(fast=fast.url, slow=slow.url))
    facades = [
        start_facade(tmp, controller, name=f"facade{i}", env={"KSCOPE_REQUIRE_KEY": "1"})
        for i in range(2)
    ]
    stack = Stack(tmp, controller, facades)
    try:
        ready = control_pb2.INSTANCE_STATE_READY
        for model in ("one", "slow", "capped"):
            wait_until(
                lambda m=model: any(i.state == ready for i in stack.controller.list_instances(m)),
                60, what=f"{model} ready",
            )  # fmt: skip
        yield stack
    finally:
        for facade in facades:
            facade.proc.stop()
        stack.controller.proc.stop()
        fast.proc.stop()
        slow.proc.stop()
        stop_instances_left_behind(controller.state_dir)


def make_key(ctl: Controller, owner: str, **limits: int) -> tuple[str, str]:
    """A new key's (id, secret); `limits`: Limits fields, and `priority`."""
    priority = limits.pop("priority", 0)
    with ctl.channel() as channel:
        reply = keys_pb2_grpc.KeyServiceStub(channel).CreateKey(
            keys_pb2.CreateKeyRequest(
                owner=owner, name="t", limits=keys_pb2.Limits(**limits), priority=priority
            ),
            timeout=10,
        )
    return reply.key.id, reply.secret


def client(facade: Facade, secret: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{facade.base_url}/v1", api_key=secret, max_retries=0, timeout=60
    )


def chat(facade: Facade, secret: str, **extra: Any) -> httpx.Response:
    body = {"model": "one", "messages": HI, "max_tokens": 3, **extra}
    return httpx.post(
        f"{facade.base_url}/v1/chat/completions", json=body,
        headers={"Authorization": f"Bearer {secret}"}, timeout=30,
    )  # fmt: skip


def usage_rows(ctl: Controller, *args: str) -> list[dict[str, Any]]:
    done = run_kscope(ctl, "usage", "--json", *args, key=ctl.admin_key)
    assert done.returncode == 0, done.stderr
    rows: list[dict[str, Any]] = json.loads(done.stdout)["rows"]
    return rows


def row_for(rows: list[dict[str, Any]], field: str, value: str) -> dict[str, Any] | None:
    return next((r for r in rows if r[field] == value), None)


# --------------------------------------------------------------------------------- usage


def test_usage_counts_each_request_with_the_engines_tokens_and_survives_a_restart(
    stack: Stack,
) -> None:
    ctl = stack.controller
    a_id, a = make_key(ctl, "ann")
    b_id, b = make_key(ctl, "ben")
    f0, f1 = stack.facades
    # Ann: 5 requests over both facades, streams without include_usage among them.
    client(f0, a).chat.completions.create(model="one", messages=HI, max_tokens=3)
    client(f1, a).chat.completions.create(model="one", messages=HI, max_tokens=4)
    for facade, max_tokens in ((f0, 5), (f1, 6)):
        stream = client(facade, a).chat.completions.create(
            model="one", messages=HI, max_tokens=max_tokens, stream=True,
        )  # fmt: skip
        chunks = list(stream)
        assert all(c.usage is None for c in chunks)  # nobody asked: no usage chunk shown
    stream = client(f0, a).chat.completions.create(
        model="one", messages=HI, max_tokens=7, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    assert [c.usage for c in stream][-1] is not None
    # Ben: 3 embeddings-free chat requests through one facade.
    for max_tokens in (1, 1, 2):
        client(f1, b).chat.completions.create(model="one", messages=HI, max_tokens=max_tokens)

    want = {
        a_id: {"requests": 5, "prompt_tokens": 5 * PROMPT_TOKENS, "completion_tokens": 25},
        b_id: {"requests": 3, "prompt_tokens": 3 * PROMPT_TOKENS, "completion_tokens": 4},
    }

    def counted(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
        out = {}
        for key_id in want:
            row = row_for(rows, "key", key_id)
            if row is not None:
                out[key_id] = {k: row[k] for k in ("requests", "prompt_tokens",
                                                    "completion_tokens")}  # fmt: skip
        return out

    wait_until(lambda: counted(usage_rows(ctl, "--by", "key")) == want, 15, 0.5,
               what="usage reported")  # fmt: skip
    by_key = usage_rows(ctl, "--by", "key")
    assert row_for(by_key, "key", a_id)["owner"] == "ann"  # type: ignore[index]
    # `--key key_…` (the spelling) filters like --key-id; the caller's
    # credential comes from KSCOPE_API_KEY then.
    only_ann = usage_rows(ctl, "--by", "key", "--key", a_id)
    assert [r["key"] for r in only_ann] == [a_id]
    by_model = row_for(usage_rows(ctl, "--by", "model", "--owner", "ben"), "model", "one")
    assert by_model is not None and by_model["total_tokens"] == 3 * PROMPT_TOKENS + 4

    # A user key reads its own owner's usage only.
    own = run_kscope(ctl, "usage", "--json", "--by", "owner", key=b)
    assert own.returncode == 0, own.stderr
    assert [r["owner"] for r in json.loads(own.stdout)["rows"]] == ["ben"]
    other = run_kscope(ctl, "usage", "--json", "--owner", "ann", key=b)
    assert other.returncode == 1 and "PERMISSION_DENIED" in other.stderr

    table = run_kscope(ctl, "usage", "--by", "key", key=ctl.admin_key)
    assert table.returncode == 0 and a_id in table.stdout and "PROMPT" in table.stdout

    # The totals are in the controller's store: a restart keeps them.
    ctl.proc.kill()
    stack.controller = ctl = restart_controller(ctl, stack.tmp)
    assert counted(usage_rows(ctl, "--by", "key")) == want
    # The agents re-attach and the facades' routes come back before the next test.
    for facade in stack.facades:
        for model in ("one", "slow"):
            wait_until(lambda f=facade, m=model: chat(f, b, model=m).status_code == 200, 30, 0.5,
                       what="routes back after the restart")  # fmt: skip


def test_with_two_models_a_request_must_name_one(stack: Stack) -> None:
    _, secret = make_key(stack.controller, "nameless")
    reply = httpx.post(
        f"{stack.facades[0].base_url}/v1/chat/completions", json={"messages": HI},
        headers={"Authorization": f"Bearer {secret}"}, timeout=10,
    )  # fmt: skip
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "model"


def test_the_facades_metrics_count_tokens_by_owner(stack: Stack) -> None:
    _, secret = make_key(stack.controller, "metrics-owner")
    facade = stack.facades[0]
    assert chat(facade, secret, max_tokens=2).status_code == 200
    text = httpx.get(f"{facade.base_url}/metrics", timeout=10).text
    completion = (
        'kscope_facade_owner_tokens_total{kind="completion",model="one",owner="metrics-owner"} 2.0'
    )
    assert completion in text
    assert 'kscope_facade_owner_requests_total{model="one",owner="metrics-owner"} 1.0' in text


# -------------------------------------------------------------------------------- limits


def test_requests_per_minute_count_down_then_429(stack: Stack) -> None:
    _, secret = make_key(stack.controller, "rpm-owner", requests_per_minute=5)
    facade = stack.facades[0]
    remaining = []
    for _ in range(5):
        reply = chat(facade, secret)
        assert reply.status_code == 200, reply.text
        assert reply.headers["x-ratelimit-limit-requests"] == "5"
        remaining.append(int(reply.headers["x-ratelimit-remaining-requests"]))
        assert reply.headers["x-ratelimit-reset-requests"].endswith("s")
    assert remaining == [4, 3, 2, 1, 0]
    refused = chat(facade, secret)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "requests_per_minute_exceeded")
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    # The SDK sees the same (it would retry after Retry-After itself).
    with pytest.raises(openai.RateLimitError):
        client(facade, secret).chat.completions.create(model="one", messages=HI)


def test_max_concurrent_refuses_the_third_stream(stack: Stack) -> None:
    _, secret = make_key(stack.controller, "conc-owner", max_concurrent=2)
    facade = stack.facades[0]
    started = threading.Barrier(3, timeout=30)
    results: list[int] = []

    def stream() -> None:
        body = {"model": "slow", "messages": HI, "max_tokens": 20, "stream": True}
        with httpx.stream(
            "POST", f"{facade.base_url}/v1/chat/completions", json=body,
            headers={"Authorization": f"Bearer {secret}"}, timeout=30,
        ) as reply:  # fmt: skip
            lines = reply.iter_lines()
            next(lines)  # the first event: the stream runs
            started.wait()
            results.append(reply.status_code)
            for _ in lines:
                pass

    threads = [threading.Thread(target=stream) for _ in range(2)]
    for thread in threads:
        thread.start()
    started.wait()
    third = chat(facade, secret, model="slow")
    for thread in threads:
        thread.join(30)
    assert results == [200, 200]
    assert third.status_code == 429, third.text
    assert third.json()["error"]["code"] == "concurrent_requests_exceeded"
    assert chat(facade, secret).status_code == 200  # once they ended


def test_a_daily_token_budget_stops_a_key_with_a_clear_message(stack: Stack) -> None:
    _, secret = make_key(stack.controller, "daily-owner", daily_tokens=2 * PROMPT_TOKENS + 10)
    facade = stack.facades[1]
    assert chat(facade, secret, max_tokens=10).status_code == 200
    assert chat(facade, secret, max_tokens=10).status_code == 200  # crosses the budget
    refused = chat(facade, secret)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "daily_tokens_exceeded"
    assert "daily budget" in error["message"] and "00:00 UTC" in error["message"]
    assert int(refused.headers["retry-after"]) <= 86400


def test_a_limit_holds_across_two_facades(stack: Stack) -> None:
    _, secret = make_key(stack.controller, "spread-owner", requests_per_minute=6)
    f0, f1 = stack.facades
    for facade in (f0, f1, f0, f1, f0, f1):
        assert chat(facade, secret).status_code == 200
    # Within two reports (about 2 s, docs/usage.md) each facade knows the other's three.
    time.sleep(2.5)
    assert chat(f0, secret).status_code == 429
    assert chat(f1, secret).status_code == 429


def test_an_owners_limit_covers_all_its_keys(stack: Stack) -> None:
    ctl = stack.controller
    done = run_kscope(ctl, "keys", "limits", "--owner", "team", "--rpm", "3", "--json",
                      key=ctl.admin_key)  # fmt: skip
    assert done.returncode == 0, done.stderr
    _, first = make_key(ctl, "team")
    _, second = make_key(ctl, "team")
    facade = stack.facades[0]
    assert [chat(facade, k).status_code for k in (first, second, first)] == [200, 200, 200]
    refused = chat(facade, second)
    assert refused.status_code == 429
    assert "owner" in refused.json()["error"]["message"]


def test_the_catalog_limits_each_keys_use_of_a_model(stack: Stack) -> None:
    _, secret = make_key(stack.controller, "catalog-capped")
    facade = stack.facades[0]
    first = chat(facade, secret, model="capped")
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert chat(facade, secret, model="capped").status_code == 200
    refused = chat(facade, secret, model="capped")
    assert refused.status_code == 429
    assert "on 'capped'" in refused.json()["error"]["message"]
    assert chat(facade, secret, model="one").status_code == 200  # other models: no such limit


def test_keys_update_changes_a_live_keys_limit(stack: Stack) -> None:
    ctl = stack.controller
    key_id, secret = make_key(ctl, "update-owner")
    facade = stack.facades[0]
    assert chat(facade, secret).status_code == 200
    assert "x-ratelimit-limit-requests" not in chat(facade, secret).headers
    done = run_kscope(ctl, "keys", "update", key_id, "--rpm", "2", key=ctl.admin_key)
    assert done.returncode == 0, done.stderr
    assert "rpm=2" in done.stdout
    # The facade hears of the change at once (WatchKeyEvents) and asks again.
    wait_until(lambda: chat(facade, secret).status_code == 429, 5, 0.2, what="the new limit")
    # A user key may not change limits.
    refused = run_kscope(ctl, "keys", "update", key_id, "--rpm", "0", key=secret)
    assert refused.returncode == 1 and "PERMISSION_DENIED" in refused.stderr


def test_a_key_made_by_a_user_key_is_no_looser(stack: Stack) -> None:
    ctl = stack.controller
    _, parent = make_key(ctl, "nested", requests_per_minute=10, max_concurrent=2)
    loose = run_kscope(ctl, "keys", "create", "--name", "child", "--rpm", "50", key=parent)
    assert loose.returncode == 1 and "requests_per_minute at most 10" in loose.stderr
    made = run_kscope(ctl, "keys", "create", "--name", "child", "--rpm", "5", "--json",
                      key=parent)  # fmt: skip
    assert made.returncode == 0, made.stderr
    limits = json.loads(made.stdout)["key"]["limits"]
    assert limits == {"requests_per_minute": "5", "max_concurrent": "2"}  # inherited


# ----------------------------------------------------------------------------- priority


def test_a_priority_key_goes_ahead_in_a_contended_queue(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    with one_model_stack(
        tmp_path_factory.mktemp("priority"), "--first-token-delay-ms", "600",
        catalog="max_concurrency = 1\nqueue_size = 100\n",
        facade_env={"KSCOPE_REQUIRE_KEY": "1"},
    ) as stack:  # fmt: skip
        controller, facade = stack.controller, stack.facade
        # One owner: fair share between owners cannot be what puts it first.
        _, batch = make_key(controller, "lab")
        _, interactive = make_key(controller, "lab", priority=10)
        done: list[tuple[float, str]] = []
        lock = threading.Lock()

        def ask(secret: str, label: str) -> None:
            client(facade, secret).chat.completions.create(
                model="one", messages=HI, max_tokens=1,
            )  # fmt: skip
            with lock:
                done.append((time.monotonic(), label))

        for secret in (batch, interactive):  # both keys known to the facade before the race
            client(facade, secret).models.list()
        batch_threads = [threading.Thread(target=ask, args=(batch, "batch")) for _ in range(8)]
        for thread in batch_threads:
            thread.start()
        wait_until(lambda: sum(i.queued for i in controller.list_instances("one")) >= 5, 20,
                   0.05, what="the batch queued")  # fmt: skip
        urgent = threading.Thread(target=ask, args=(interactive, "interactive"))
        urgent.start()
        for thread in [*batch_threads, urgent]:
            thread.join(60)
        order = [label for _, label in sorted(done)]
        assert len(order) == 9
        assert order.index("interactive") <= 1, order  # next after the one at the engine
