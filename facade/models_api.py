"""GET /v1/models and /v1/models/{id}: the catalog with each model's live state."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter
from fastapi.responses import Response

from facade.errors import ApiError
from facade.routing import ModelEntry, RouteTable


def model_object(name: str, entry: ModelEntry) -> dict[str, Any]:
    """An OpenAI model object, with KScope's state fields beside the standard ones."""
    info = entry.info
    return {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": "kscope",
        "state": entry.state,
        "state_message": info.state_message,
        "ready_replicas": info.ready_replicas,
        "live_replicas": info.live_replicas,
        "engine": info.engine,
    }


def _json(content: object) -> Response:
    return Response(orjson.dumps(content), media_type="application/json")


def models_router(table: RouteTable) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models")
    async def list_models() -> Response:
        data = [model_object(name, entry) for name, entry in sorted(table.models.items())]
        return _json({"object": "list", "data": data})

    @router.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> Response:
        entry = table.models.get(model_id)
        if entry is None:
            raise ApiError(
                404, f"The model '{model_id}' does not exist.", code="model_not_found",
                param="model",
            )  # fmt: skip
        return _json(model_object(model_id, entry))

    return router
