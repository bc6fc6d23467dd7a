"""GET /v1/queue/stats: each model's request queue, summed over its instances
and per instance, in the shape the original MLX server documented:

    {"status": "ok",
     "queue_stats": {"<model>": {"running": true, "queue_size": 2, "max_queue_size": 100,
                                 "active_requests": 1, "max_concurrency": 1,
                                 "instances": {"<instance id>": {...the same fields,
                                                                 "state": "ready"}}}}}

`queue_size` counts waiting requests, `active_requests` those the engine works
on. `waiting_by_owner` lists the waiting requests per key owner, most first:
the fair-share queue serves owners in turn, so this is who waits how much. An
admin key sees the owners' names; any other key sees "you" for its own owner
and null for the rest. A limit is null where there is none (vLLM and openai engines by default).
Figures come from the agents' load reports via the controller, so they are at
most one report interval (1 s by default) old.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from facade.auth import GRANT_SCOPE_KEY, OPEN, Grant
from facade.errors import ApiError
from facade.routing import RouteTable, RouteWatcher
from kscope.v1 import control_pb2

_STATE_NAMES = {
    value: name.removeprefix("INSTANCE_STATE_").lower()
    for name, value in control_pb2.InstanceState.items()
}
_CONTROLLER_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Viewer:
    """Who asks: what of the owners' names they may see."""

    owner: str = ""
    admin: bool = False

    def name(self, owner: str) -> str | None:
        if self.admin:
            return owner
        return "you" if owner == self.owner else None


def _by_owner(counts: Mapping[str, int], viewer: Viewer) -> list[dict[str, Any]]:
    ranked = sorted(((n, o) for o, n in counts.items() if n > 0), key=lambda t: (-t[0], t[1]))
    return [{"owner": viewer.name(owner), "waiting": n} for n, owner in ranked]


def _instance_stats(inst: control_pb2.Instance, viewer: Viewer) -> dict[str, Any]:
    unlimited = inst.max_concurrency <= 0
    return {
        "waiting_by_owner": _by_owner(inst.queued_by_caller, viewer),
        "running": inst.state == control_pb2.INSTANCE_STATE_READY,
        "state": _STATE_NAMES.get(inst.state, "unknown"),
        "queue_size": inst.queued,
        "max_queue_size": None if unlimited else inst.max_queue_size,
        "active_requests": inst.in_flight,
        "max_concurrency": None if unlimited else inst.max_concurrency,
    }


def _limit_sum(values: list[int | None]) -> int | None:
    """The sum of per-instance limits; none when any instance has none."""
    if any(v is None for v in values):
        return None
    return sum(v for v in values if v is not None)


def queue_stats(
    models: Iterable[str], instances: Iterable[control_pb2.Instance], viewer: Viewer = Viewer()
) -> dict[str, Any]:
    """The response body: every model, with its live instances' queues."""
    per_model: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in models}
    waiting: dict[str, dict[str, int]] = {}
    for inst in instances:
        per_model.setdefault(inst.model, {})[inst.id] = _instance_stats(inst, viewer)
        counts = waiting.setdefault(inst.model, {})
        for owner, n in inst.queued_by_caller.items():
            counts[owner] = counts.get(owner, 0) + n
    stats: dict[str, Any] = {}
    for name, members in sorted(per_model.items()):
        ready = [s for s in members.values() if s["running"]]
        stats[name] = {
            "running": bool(ready),
            "queue_size": sum(s["queue_size"] for s in members.values()),
            "max_queue_size": _limit_sum([s["max_queue_size"] for s in ready]) if ready else 0,
            "active_requests": sum(s["active_requests"] for s in members.values()),
            "max_concurrency": _limit_sum([s["max_concurrency"] for s in ready]) if ready else 0,
            "waiting_by_owner": _by_owner(waiting.get(name, {}), viewer),
            "instances": members,
        }
    return {"status": "ok", "queue_stats": stats}


def queue_router(table: RouteTable, watcher: Callable[[], RouteWatcher | None]) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/queue/stats")
    async def stats(request: Request) -> Response:
        current = watcher()
        instances = (
            await current.list_instances(_CONTROLLER_TIMEOUT_S) if current is not None else None
        )
        if instances is None:
            raise ApiError(
                503, "queue statistics are unavailable: the controller does not answer",
                "service_unavailable_error", code="controller_unavailable", retry_after_s=2,
            )  # fmt: skip
        grant: Grant = request.scope.get(GRANT_SCOPE_KEY) or OPEN
        body = queue_stats(table.models, instances, Viewer(grant.owner, grant.admin))
        return Response(orjson.dumps(body), media_type="application/json")

    return router
