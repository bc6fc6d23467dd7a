"""The portal's pages, mounted at /portal by the facade (never on the /v1 path).

Server-rendered Jinja2; a signed session cookie (Starlette's SessionMiddleware,
itself plain ASGI); a CSRF token in every form. Keys are created, listed and
revoked through the controller's KeyService with the portal's admin service
key, always for the logged-in user only. A model's page charts the controller's
telemetry (ControlService.GetTelemetry) as inline SVG; the usage page
(facade/portal/usage.py) shows the user's own usage, and admin users everyone's.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from facade.auth import KeyChecker
from facade.portal.charts import model_charts
from facade.portal.login import check_login
from facade.portal.security import (
    CSRF_FIELD,
    CsrfRefused,
    SecurityHeaders,
    checked_form,
    csrf_token,
)
from facade.portal.usage import usage_page
from facade.routing import RouteTable, RouteWatcher
from facade.settings import FacadeSettings
from kscope.v1 import keys_pb2

log = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent
_RPC_TIMEOUT_S = 5.0
_MAX_KEY_DAYS = 3650
_CHART_RECORDS = 180
"""Samples drawn per chart: 30 minutes at the default interval of 10 s."""


@dataclass
class KeyRow:
    """One of the user's keys, as the keys page shows it."""

    id: str
    name: str
    prefix: str
    models: str
    limits: str
    """"60 requests/min, 4 at once …", or "none"."""
    created: str
    expires: str
    status: str


def _day(ts: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts.ToNanoseconds() / 1e9))


def _clock(unix_seconds: float) -> str:
    return time.strftime("%H:%M:%S UTC", time.gmtime(unix_seconds))


def _row(key: keys_pb2.ApiKey) -> KeyRow:
    expired = key.expires_at.ToNanoseconds() / 1e9 <= time.time()
    status = "revoked" if key.revoked else "expired" if expired else "active"
    return KeyRow(
        key.id, key.name, key.prefix, ", ".join(key.models) or "all models",
        limits_text(key.limits), _day(key.created_at), _day(key.expires_at), status,
    )  # fmt: skip


def limits_text(limits: keys_pb2.Limits) -> str:
    """A key's limits in words, for people."""
    parts = [
        f"{value:,} {what}"
        for value, what in (
            (limits.requests_per_minute, "requests/min"), (limits.tokens_per_minute, "tokens/min"),
            (limits.max_concurrent, "at once"), (limits.daily_tokens, "tokens/day"),
        )
        if value
    ]  # fmt: skip
    return ", ".join(parts) or "none"


class Portal:
    """Request handlers; the state they need is passed in."""

    def __init__(
        self,
        settings: FacadeSettings,
        table: RouteTable,
        keys: Callable[[], KeyChecker | None],
        watcher: Callable[[], RouteWatcher | None],
    ):
        self.settings = settings
        self.portal = settings.portal
        self.table = table
        self._keys = keys
        self._watcher = watcher
        """The facade's controller channel (None until the facade has started)."""
        self.templates = Jinja2Templates(directory=str(_HERE / "templates"))

    # --- helpers -----------------------------------------------------------------------------

    def base_url(self, request: Request) -> str:
        if self.settings.base_url:
            return self.settings.base_url.rstrip("/").removesuffix("/v1")
        host = request.headers.get("host", f"{self.settings.host}:{self.settings.port}")
        return f"{request.url.scheme}://{host}"

    def render(self, request: Request, name: str, status: int = 200, **context: Any) -> Response:
        context.update(
            user=request.session.get("user"),
            csrf_field=CSRF_FIELD,
            csrf_token=csrf_token(request),
            page=name.removesuffix(".html"),
        )
        return self.templates.TemplateResponse(request, name, context, status_code=status)

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        key = self.portal.service_key
        return (("authorization", f"Bearer {key.get_secret_value()}"),) if key else ()

    def _stub(self) -> Any:
        checker = self._keys()
        if checker is None or self.portal.service_key is None:
            return None
        return checker.stub

    async def _user_keys(self, user: str) -> tuple[list[keys_pb2.ApiKey], str]:
        stub = self._stub()
        if stub is None:
            return [], "Key management is not configured on this server (no service key)."
        try:
            reply = await stub.ListKeys(
                keys_pb2.ListKeysRequest(owner=user, include_revoked=True),
                metadata=self._metadata(),
                timeout=_RPC_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("ListKeys for the portal failed: %s", exc.code().name)
            return [], "The key service is unavailable right now. Please try again shortly."
        return list(reply.keys), ""

    # --- pages -------------------------------------------------------------------------------

    async def index(self, request: Request) -> Response:
        target = "keys" if request.session.get("user") else "login"
        return RedirectResponse(f"/portal/{target}", status_code=303)

    async def login_page(self, request: Request) -> Response:
        return self.render(request, "login.html")

    async def login(self, request: Request) -> Response:
        form = await checked_form(request)
        username = str(form.get("username", ""))
        result = await check_login(self.portal, username, str(form.get("password", "")))
        if result.user is None:
            return self.render(
                request, "login.html", status=401, error=result.message, username=username
            )
        # A fresh session (and CSRF token) at login: no fixation of a planted session.
        request.session.clear()
        request.session["user"] = result.user
        request.session["csrf"] = secrets.token_urlsafe(32)
        log.info("portal login: %s", result.user)
        return RedirectResponse("/portal/keys", status_code=303)

    async def logout(self, request: Request) -> Response:
        await checked_form(request)
        request.session.clear()
        return RedirectResponse("/portal/login", status_code=303)

    async def keys_page(self, request: Request) -> Response:
        user = request.session.get("user")
        if not user:
            return RedirectResponse("/portal/login", status_code=303)
        return await self._keys_view(request, user)

    async def _keys_view(
        self, request: Request, user: str, status: int = 200, **extra: Any
    ) -> Response:
        keys, error = await self._user_keys(user)
        return self.render(
            request, "keys.html", status=status,
            keys=[_row(k) for k in reversed(keys)],
            error=extra.pop("error", "") or error,
            default_days=self.portal.key_default_days, max_days=_MAX_KEY_DAYS,
            base_url=self.base_url(request), **extra,
        )  # fmt: skip

    async def create_key(self, request: Request) -> Response:
        user = request.session.get("user")
        if not user:
            return RedirectResponse("/portal/login", status_code=303)
        form = await checked_form(request)
        name = str(form.get("name", "")).strip()[:100]
        days_text = str(form.get("days", "")).strip()
        models = tuple(m.strip() for m in str(form.get("models", "")).split(",") if m.strip())
        if not name:
            return await self._keys_view(request, user, 400, error="Give the key a name.")
        if not days_text.isdigit() or not 1 <= int(days_text) <= _MAX_KEY_DAYS:
            message = f"The expiry is a whole number of days from 1 to {_MAX_KEY_DAYS}."
            return await self._keys_view(request, user, 400, error=message)
        stub = self._stub()
        if stub is None:
            return await self._keys_view(request, user, 503)
        try:
            reply = await stub.CreateKey(
                keys_pb2.CreateKeyRequest(
                    owner=user, name=name, expires_in_seconds=int(days_text) * 86400,
                    models=list(models),
                ),
                metadata=self._metadata(),
                timeout=_RPC_TIMEOUT_S,
            )  # fmt: skip
        except grpc.aio.AioRpcError as exc:
            log.warning("CreateKey for the portal failed: %s", exc.code().name)
            message = "The key could not be created: " + (exc.details() or exc.code().name)
            return await self._keys_view(request, user, 502, error=message)
        # Shown in this response only; the controller keeps just its hash.
        return await self._keys_view(
            request, user, new_secret=reply.secret, new_name=reply.key.name
        )

    async def revoke_key(self, request: Request) -> Response:
        user = request.session.get("user")
        if not user:
            return RedirectResponse("/portal/login", status_code=303)
        await checked_form(request)
        key_id = request.path_params["key_id"]
        keys, error = await self._user_keys(user)
        # The service key may revoke anyone's key: only the user's own go through.
        if error or key_id not in {k.id for k in keys}:
            return await self._keys_view(request, user, 404, error=error or "No such key.")
        try:
            await self._stub().RevokeKey(
                keys_pb2.RevokeKeyRequest(key_id=key_id),
                metadata=self._metadata(),
                timeout=_RPC_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("RevokeKey for the portal failed: %s", exc.code().name)
            return await self._keys_view(request, user, 502, error="The key could not be revoked.")
        return RedirectResponse("/portal/keys", status_code=303)

    async def models_page(self, request: Request) -> Response:
        if not request.session.get("user"):
            return RedirectResponse("/portal/login", status_code=303)
        models = [
            {
                "name": name,
                "state": entry.state,
                "message": entry.info.state_message,
                "ready": entry.info.ready_replicas,
                "live": entry.info.live_replicas,
                "engine": entry.info.engine,
            }
            for name, entry in sorted(self.table.models.items())
        ]
        return self.render(request, "models.html", models=models)

    async def model_page(self, request: Request) -> Response:
        if not request.session.get("user"):
            return RedirectResponse("/portal/login", status_code=303)
        name = request.path_params["name"]
        entry = self.table.models.get(name)
        if entry is None:
            return self.render(
                request, "model.html", status=404, model_name=name, model=None,
                controller_connected=self.table.received.is_set(),
            )  # fmt: skip
        source = self._watcher()
        records = await source.telemetry(name, _RPC_TIMEOUT_S, _CHART_RECORDS) if source else None
        latest = records[-1] if records else None
        return self.render(
            request, "model.html", model_name=name,
            model={
                "state": entry.state, "message": entry.info.state_message,
                "ready": entry.info.ready_replicas, "live": entry.info.live_replicas,
                "engine": entry.info.engine,
            },
            telemetry_unavailable=records is None,
            charts=model_charts(records) if records else [],
            latest=latest,
            latest_time=_clock(latest.time_unix_seconds) if latest else "",
        )  # fmt: skip

    async def usage_page(self, request: Request) -> Response:
        user = request.session.get("user")
        if not user:
            return RedirectResponse("/portal/login", status_code=303)
        checker = self._keys()
        stub = checker.usage_stub if checker and self.portal.service_key else None
        admin = user in self.portal.admin_users
        figures = await usage_page(stub, self._metadata(), user, admin, time.time())
        return self.render(request, "usage.html", usage=figures, admin=admin)

    async def connect_page(self, request: Request) -> Response:
        if not request.session.get("user"):
            return RedirectResponse("/portal/login", status_code=303)
        names = sorted(self.table.models) or ["MODEL"]
        return self.render(
            request, "connect.html", base_url=self.base_url(request), model=names[0], names=names
        )


async def _csrf_refused(request: Request, exc: Exception) -> Response:
    return Response(
        "The form was stale or forged (missing CSRF token). Go back, reload and try again.",
        status_code=403,
        media_type="text/plain",
    )


def create_portal(
    settings: FacadeSettings,
    table: RouteTable,
    keys: Callable[[], KeyChecker | None],
    watcher: Callable[[], RouteWatcher | None],
) -> Starlette:
    """The portal as an ASGI app, for the facade to mount at /portal. `watcher`
    gives the facade's RouteWatcher (its controller channel) for telemetry."""
    portal = Portal(settings, table, keys, watcher)
    secret = settings.portal.session_secret
    secure = settings.portal.secure_cookie
    if secure is None:
        secure = settings.base_url.startswith("https://")
    routes = [
        Route("/", portal.index),
        Route("/login", portal.login_page, methods=["GET"]),
        Route("/login", portal.login, methods=["POST"]),
        Route("/logout", portal.logout, methods=["POST"]),
        Route("/keys", portal.keys_page, methods=["GET"]),
        Route("/keys", portal.create_key, methods=["POST"]),
        Route("/keys/{key_id}/revoke", portal.revoke_key, methods=["POST"]),
        Route("/models", portal.models_page),
        Route("/models/{name:path}", portal.model_page),
        Route("/connect", portal.connect_page),
        Route("/usage", portal.usage_page),
        Mount("/static", StaticFiles(directory=str(_HERE / "static")), name="static"),
    ]
    middleware = [
        Middleware(SecurityHeaders),
        Middleware(
            SessionMiddleware,
            secret_key=secret.get_secret_value() if secret else secrets.token_urlsafe(32),
            session_cookie="kscope_session",
            max_age=settings.portal.session_max_age_s,
            path="/portal",
            same_site="lax",
            https_only=secure,
        ),
    ]
    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={CsrfRefused: _csrf_refused},
    )
