"""GET /v1/models and /v1/models/{id}: what the request's key may use, with
each model's live state and what it can do.

Every name a client may put in `model` is listed, as its own entry: the
catalog's models, their aliases (`alias_of` names the model) and their LoRA
adapters (`parent` names the base model, as vLLM lists them). Beside OpenAI's
fields each entry has KScope's state fields, vLLM's `max_model_len` and
`parent`, and `capabilities` (facade/capabilities.py `Capabilities.as_json`).
A key limited to some models sees only those (`Grant.allows`, on the name
listed); a model it may not use does not exist for it here (404).
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from facade.auth import GRANT_SCOPE_KEY, OPEN, Grant
from facade.errors import ApiError
from facade.routing import ModelEntry, RouteTable


def model_object(name: str, entry: ModelEntry) -> dict[str, Any]:
    """An OpenAI model object, with KScope's state fields beside the standard ones."""
    info = entry.info
    caps = entry.capabilities
    body: dict[str, Any] = {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": "kscope",
        "parent": entry.parent or None,
        "max_model_len": (caps.max_model_len or None) if caps is not None else None,
        "state": entry.state,
        "state_message": info.state_message,
        "ready_replicas": info.ready_replicas,
        "live_replicas": info.live_replicas,
        "engine": info.engine,
        "capabilities": caps.as_json() if caps is not None else None,
    }
    if entry.alias_of:
        body["alias_of"] = entry.alias_of
    elif not entry.parent:
        body["aliases"] = list(info.aliases)
    return body


def _json(content: object) -> Response:
    return Response(orjson.dumps(content), media_type="application/json")


def _grant(request: Request) -> Grant:
    grant: Grant | None = request.scope.get(GRANT_SCOPE_KEY)
    return grant or OPEN


def models_router(table: RouteTable) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models")
    async def list_models(request: Request) -> Response:
        grant = _grant(request)
        data = [
            model_object(name, entry)
            for name, entry in sorted(table.names.items())
            if grant.allows(name)
        ]
        return _json({"object": "list", "data": data})

    @router.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> Response:
        entry = table.names.get(model_id)
        if entry is None or not _grant(request).allows(model_id):
            raise ApiError(
                404, f"The model '{model_id}' does not exist.", code="model_not_found",
                param="model",
            )  # fmt: skip
        return _json(model_object(model_id, entry))

    return router
