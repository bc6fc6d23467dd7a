"""Fair share at a contended model, with real processes: owner A queues twenty
requests at an agent that serves one at a time, then owner B sends one; B's is
answered second, not twenty-first (the order read from the answers' times).
/v1/queue/stats shows who waits, by name only to an admin key."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from kscope.v1 import keys_pb2, keys_pb2_grpc
from tests.procs import Controller, Facade, one_model_stack, wait_until

pytestmark = pytest.mark.quota


@pytest.fixture(scope="module")
def contended(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Controller, Facade]]:
    # Each request holds the agent's one slot 1.2 s: the lone request surely
    # arrives while the first of the queue is still at the engine.
    with one_model_stack(
        tmp_path_factory.mktemp("fair"), "--first-token-delay-ms", "1200",
        catalog="max_concurrency = 1\nqueue_size = 100\nexpected_startup_s = 3\n",
        facade_env={"KSCOPE_REQUIRE_KEY": "1"},
    ) as stack:  # fmt: skip
        yield stack.controller, stack.facade


def _key(controller: Controller, owner: str) -> str:
    with controller.channel() as channel:
        reply = keys_pb2_grpc.KeyServiceStub(channel).CreateKey(
            keys_pb2.CreateKeyRequest(owner=owner, name="fair"), timeout=10
        )
    return reply.secret


def _queue(facade: Facade, key: str) -> list[dict[str, Any]]:
    reply = httpx.get(f"{facade.base_url}/v1/queue/stats",
                      headers={"Authorization": f"Bearer {key}"}, timeout=10)  # fmt: skip
    assert reply.status_code == 200, reply.text
    waiting: list[dict[str, Any]] = reply.json()["queue_stats"]["one"]["waiting_by_owner"]
    return waiting


def test_a_lone_request_is_served_next_not_after_the_queue(
    contended: tuple[Controller, Facade],
) -> None:
    controller, facade = contended
    keys = {owner: _key(controller, owner) for owner in ("alice", "bob")}
    done: list[tuple[float, str]] = []
    lock = threading.Lock()

    def ask(owner: str) -> None:
        client = openai.OpenAI(base_url=f"{facade.base_url}/v1", api_key=keys[owner],
                               max_retries=0, timeout=60)  # fmt: skip
        client.chat.completions.create(
            model="one", messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )
        with lock:
            done.append((time.monotonic(), owner))

    # Bob's key is known to the facade before the race (no check on his way in).
    openai.OpenAI(base_url=f"{facade.base_url}/v1", api_key=keys["bob"]).models.list()
    alice = [threading.Thread(target=ask, args=("alice",)) for _ in range(20)]
    for thread in alice:
        thread.start()
    # Alice's requests are in: one at the engine, the rest queued at the agent
    # (the load report lags a little, so not all nineteen need to show).
    seen: list[int] = []

    def queued() -> bool:
        seen.append(sum(i.queued for i in controller.list_instances("one")))
        return seen[-1] >= 15

    wait_until(queued, 20, 0.05, what="alice's requests queued at the agent")
    # Who waits is visible: by name to an admin key, as "you"/null to others.
    as_bob = _queue(facade, keys["bob"])
    assert as_bob and as_bob[0]["owner"] is None and as_bob[0]["waiting"] >= 10
    as_admin = _queue(facade, controller.admin_key)
    assert as_admin[0]["owner"] == "alice"
    assert _queue(facade, keys["alice"])[0]["owner"] == "you"
    bob = threading.Thread(target=ask, args=("bob",))
    bob.start()
    for thread in [*alice, bob]:
        thread.join(120)
    order = [owner for _, owner in sorted(done)]
    assert len(order) == 21
    assert order.index("bob") <= 1, (
        order,
        seen[-5:],
    )  # second at the latest (the first was at the engine)
