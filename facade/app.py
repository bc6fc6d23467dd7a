"""The facade's ASGI application: raw handlers on the token path, FastAPI for the rest."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from facade.errors import ApiError
from facade.models_api import models_router
from facade.proxy import KINDS, InferenceProxy, Receive, Scope, Send, send_error
from facade.queue_api import queue_router
from facade.routing import RouteTable, RouteWatcher
from facade.settings import FacadeSettings

log = logging.getLogger(__name__)


def _error_response(error: ApiError) -> Response:
    headers = {"retry-after": str(error.retry_after_s)} if error.retry_after_s is not None else None
    return Response(error.body(), error.status, headers, media_type="application/json")


class FacadeApp:
    """ASGI entry point. POSTs to the inference endpoints go straight to the
    proxy; everything else (models, health, docs) to FastAPI."""

    def __init__(self, settings: FacadeSettings):
        self.settings = settings
        self.table = RouteTable()
        self.watcher: RouteWatcher | None = None
        self.proxy: InferenceProxy | None = None
        self._api_key = (
            f"Bearer {settings.api_key.get_secret_value()}".encode() if settings.api_key else None
        )
        self.api = self._build_api()

    @contextlib.asynccontextmanager
    async def _lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        # Channels must be created inside the running loop, not at import.
        self.watcher = RouteWatcher(self.settings.controller, self.table)
        self.proxy = InferenceProxy(self.settings, self.table, self.watcher)
        task = asyncio.create_task(self.watcher.run(), name="route-watcher")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self.watcher.close()
            await self.table.close()

    def _build_api(self) -> FastAPI:
        api = FastAPI(
            title="KScope",
            description="OpenAI-compatible gateway",
            lifespan=self._lifespan,
        )
        api.include_router(models_router(self.table))
        api.include_router(queue_router(self.table, lambda: self.watcher))

        @api.get("/health")
        async def health() -> dict[str, object]:
            return {
                "status": "ok",
                "controller_connected": self.watcher is not None and self.watcher.connected,
                "route_table_version": self.table.version,
            }

        @api.exception_handler(ApiError)
        async def api_error(_: Request, exc: ApiError) -> Response:
            return _error_response(exc)

        @api.exception_handler(StarletteHTTPException)
        async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
            if exc.status_code == 404:
                message = f"no route for {request.method} {request.url.path}"
            elif exc.status_code == 405:
                message = f"method {request.method} is not allowed on {request.url.path}"
            else:
                message = str(exc.detail)
            return _error_response(ApiError(exc.status_code, message, code=str(exc.status_code)))

        @api.exception_handler(RequestValidationError)
        async def validation_error(_: Request, exc: RequestValidationError) -> Response:
            return _error_response(ApiError(400, str(exc.errors())))

        return api

    def _authorized(self, scope: Scope) -> ApiError | None:
        if self._api_key is None:
            return None
        for name, value in scope["headers"]:
            if name == b"authorization":
                if hmac.compare_digest(value, self._api_key):
                    return None
                return ApiError(
                    401, "Incorrect API key provided.", "authentication_error",
                    code="invalid_api_key",
                )  # fmt: skip
        return ApiError(
            401,
            "Missing API key: send 'Authorization: Bearer <key>'.",
            "authentication_error",
            code="missing_api_key",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            if path.startswith("/v1/"):
                denied = self._authorized(scope)
                if denied is not None:
                    await send_error(send, denied)
                    return
                kind = KINDS.get(path)
                if kind is not None and self.proxy is not None:
                    if scope["method"] != "POST":
                        await send_error(send, ApiError(405, f"use POST for {path}", code="405"))
                        return
                    await self.proxy(scope, receive, send, kind)
                    return
        await self.api(scope, receive, send)


def create_app(settings: FacadeSettings) -> FacadeApp:
    return FacadeApp(settings)
