"""The facade's ASGI application: raw handlers on the token path, FastAPI for the rest."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from facade.asgi import Receive, Scope, Send
from facade.auth import GRANT_SCOPE_KEY, KeyChecker, PendingCheck
from facade.endpoints import KINDS
from facade.errors import ApiError
from facade.mesh import FacadeMesh, GivenCertificate, connect
from facade.metrics import facade_metrics
from facade.models_api import models_router
from facade.proxy import InferenceProxy
from facade.queue_api import queue_router
from facade.request_log import access, configure, request_id, with_request_id
from facade.response import send_error
from facade.routing import RouteTable, RouteWatcher
from facade.settings import FacadeSettings
from kscope.v1 import usage_pb2_grpc
from kscope_common.metrics import CONTENT_TYPE_LATEST, registry, render
from kscope_common.tls import EnrollmentError

log = logging.getLogger(__name__)


def _error_response(error: ApiError) -> Response:
    headers = {"retry-after": str(error.retry_after_s)} if error.retry_after_s is not None else None
    return Response(error.body(), error.status, headers, media_type="application/json")


class FacadeApp:
    """ASGI entry point. POSTs to the inference endpoints (facade/endpoints.py)
    go straight to the proxy; everything else (models, health, docs) to FastAPI."""

    def __init__(self, settings: FacadeSettings, given: GivenCertificate | None = None):
        self.settings = settings
        self._given = given
        self.mesh: FacadeMesh | None = None
        self.table = RouteTable()
        self.watcher: RouteWatcher | None = None
        self.proxy: InferenceProxy | None = None
        self.keys: KeyChecker | None = None
        self.api = self._build_api()
        configure(settings.access_log, settings.access_log_path)

    @contextlib.asynccontextmanager
    async def _lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        # Channels must be created inside the running loop, not at import.
        try:
            self.mesh = mesh = await connect(self.settings, self._given)
        except EnrollmentError as exc:
            log.error("%s", exc)
            raise
        self.table.dial = mesh.agent_channel
        mesh.on_renewal(self.table.redial)
        self.watcher = RouteWatcher(mesh.controller, self.table)
        self.proxy = InferenceProxy(self.settings, self.table, self.watcher)
        self.keys = KeyChecker(
            mesh.controller,
            self.settings.api_key.get_secret_value() if self.settings.api_key else None,
            self.settings.require_key,
            self.settings.key_cache_ttl_s,
        )
        controller = mesh.controller
        tasks = [
            asyncio.create_task(self.watcher.run(), name="route-watcher"),
            asyncio.create_task(self.keys.watch(), name="key-watcher"),
            asyncio.create_task(
                self.proxy.usage.run(lambda: usage_pb2_grpc.UsageServiceStub(controller.channel())),
                name="usage-reporter",
            ),
        ]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self.keys.close()
            await self.watcher.close()
            await self.table.close()
            await mesh.close()

    def _build_api(self) -> FastAPI:
        api = FastAPI(
            title="KScope",
            description="OpenAI-compatible gateway",
            lifespan=self._lifespan,
        )
        api.include_router(models_router(self.table))
        api.include_router(queue_router(self.table, lambda: self.watcher))
        if self.settings.portal.enabled:
            # Imported here: the portal (Jinja2, sessions) stays off the /v1 path.
            from facade.portal.routes import create_portal

            portal = create_portal(
                self.settings, self.table, lambda: self.keys, lambda: self.watcher
            )
            api.mount("/portal", portal)

        metrics = registry(lambda: facade_metrics(self.table, lambda: self.proxy))

        @api.get("/metrics", include_in_schema=False)
        async def prometheus() -> Response:
            return Response(render(metrics), media_type=CONTENT_TYPE_LATEST)

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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            kind = KINDS.get(path)
            # Every /v1 path, and the inference paths outside /v1 (vLLM's
            # /tokenize, /pooling, /rerank …), needs a key.
            if kind is not None or path.startswith("/v1/"):
                rid = request_id(scope)
                if self.keys is None:
                    await self._refuse(scope, send, ApiError(503, "starting", code="starting"))
                    return
                verdict = self.keys.check(scope)
                if type(verdict) is PendingCheck:
                    # Only keys not seen lately ask the controller.
                    verdict = await self.keys.fetch(verdict)
                if isinstance(verdict, ApiError):
                    await self._refuse(scope, send, verdict)
                    return
                scope[GRANT_SCOPE_KEY] = verdict
                if kind is not None and self.proxy is not None:
                    if scope["method"] != "POST":
                        await send_error(send, ApiError(405, f"use POST for {path}", code="405"))
                        return
                    await self.proxy(scope, receive, send, kind)
                    return
                send = with_request_id(send, rid)
        await self.api(scope, receive, send)

    @staticmethod
    async def _refuse(scope: Scope, send: Send, error: ApiError) -> None:
        """A request that needs a key, refused before it reached its handler."""
        started = time.monotonic()
        await send_error(send, error, [(b"x-request-id", request_id(scope))])
        access(
            scope, model="", key_id="", owner="", status=error.status,
            duration_s=time.monotonic() - started, ttft_s=0.0, usage=None,
        )  # fmt: skip


def create_app(settings: FacadeSettings, given: GivenCertificate | None = None) -> FacadeApp:
    """The facade; `given`: a certificate made for it by `kscope serve`."""
    return FacadeApp(settings, given)
