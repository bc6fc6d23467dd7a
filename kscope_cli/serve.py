"""`kscope serve`: controller, facade and one agent on one machine, like `vllm serve`."""

from __future__ import annotations

import asyncio
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from controller.catalog import Catalog, EngineKind, ModelSpec
from controller.server import start_controller
from controller.settings import ControllerSettings
from facade.main import serve_http
from facade.mesh import GivenCertificate
from facade.portal.settings import PortalSettings
from facade.settings import FacadeSettings
from kscope_common.pki import Identity, Role

log = logging.getLogger("kscope.serve")
SERVE_COLD_WAIT_S = 300.0
"""How long a request to `kscope serve` waits for its model at least (it
goes on as soon as the model is ready; a model that fails ends the wait)."""


def usage_text(base_url: str, model: str, api_key: str | None) -> str:
    key = api_key or "anything"
    return f"""
KScope is up: {base_url}/v1 serves model '{model}' (it answers 503 + Retry-After until ready).

  curl {base_url}/v1/models -H 'Authorization: Bearer {key}'
  curl {base_url}/v1/chat/completions -H 'Content-Type: application/json' \\
       -H 'Authorization: Bearer {key}' \\
       -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}]}}'

  python -c 'from openai import OpenAI; c = OpenAI(base_url="{base_url}/v1", api_key="{key}"); \\
print(c.chat.completions.create(model="{model}", messages=[{{"role": "user", "content": "Hi"}}]))'
"""


def keys_text(base_url: str, state_dir: Path, admin_key: str | None, controller: str) -> str:
    """How to get keys and into the portal, printed under the usage text."""
    users = state_dir / "users.toml"
    lines = []
    if admin_key:
        lines.append(
            f"  admin API key: {admin_key}   (also in {state_dir / 'admin-key'}, mode 600)"
        )
    lines += [
        f"  more keys: kscope keys create --name NAME --controller {controller} --key <admin key>"
        f" --ca {state_dir / 'tls' / 'ca.pem'}",
        f"  web portal: {base_url}/portal  (add a login: kscope users add NAME --file {users})",
    ]
    return "\n".join(lines) + "\n"


def local_portal(state_dir: Path, admin_key: str | None) -> PortalSettings:
    """The portal of `kscope serve`: local users beside the state, the admin key to
    manage keys, and (unless KSCOPE_PORTAL_* says otherwise) the rest by default."""
    overrides: dict[str, object] = {"users_file": state_dir / "users.toml"}
    if admin_key:
        overrides["service_key"] = SecretStr(admin_key)
    return PortalSettings(**overrides)  # type: ignore[arg-type]


@dataclass(frozen=True)
class QueueOptions:
    """The MLX server's queue flags; None leaves the agent's default."""

    max_concurrency: int | None = None
    queue_size: int | None = None
    queue_timeout_s: float | None = None


def build_catalog(
    engine: str,
    model: str,
    model_path: str | None,
    upstream_url: str | None,
    engine_args: str,
    queue: QueueOptions | None = None,
) -> Catalog:
    kind = EngineKind(engine)
    name = model or (Path(model_path).name if model_path else "default")
    queue = queue or QueueOptions()
    spec = ModelSpec(
        name=name,
        engine=kind,
        model_path=str(Path(model_path).resolve()) if model_path else "",
        upstream_url=upstream_url or "",
        min_replicas=1,
        max_replicas=1,
        engine_args=tuple(shlex.split(engine_args)),
        expected_startup_s=40.0 if kind is EngineKind.VLLM else 5.0,
        max_concurrency=queue.max_concurrency,
        queue_size=queue.queue_size,
        queue_timeout_s=queue.queue_timeout_s,
    )
    return Catalog(models=(spec,))


async def serve(
    catalog: Catalog,
    host: str,
    port: int,
    api_key: str | None,
    controller_port: int,
    state_dir: Path,
    require_key: bool = True,
    insecure_plaintext: bool = False,
    in_process_agents: bool = True,
) -> None:
    controller = await start_controller(
        ControllerSettings(
            host="127.0.0.1", port=controller_port, state_dir=state_dir,
            insecure_plaintext=insecure_plaintext, tie_local_agents=True,
            in_process_agents=in_process_agents,
        ),
        catalog,
    )  # fmt: skip
    spec = catalog.models[0]
    model = spec.name
    facade_settings = FacadeSettings(
        host=host,
        port=port,
        controller=f"127.0.0.1:{controller.port}",
        api_key=SecretStr(api_key) if api_key else None,
        require_key=require_key,
        portal=local_portal(state_dir, controller.admin_key),
        # The single-model MLX server answered whatever model a request named (or
        # none); its clients keep working unchanged.
        default_model=model if spec.engine is EngineKind.MLX_VLM else "",
        # Like `vllm serve` and the MLX server, which answer once the model is
        # loaded: requests that come while it starts wait for it, not 503.
        cold_wait_s=max(SERVE_COLD_WAIT_S, 3 * spec.expected_startup_s),
    )

    def announce(bound: int) -> None:
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        base_url = f"http://{shown}:{bound}"
        key = api_key or (controller.admin_key if require_key else None)
        print(usage_text(base_url, model, key), flush=True)
        print(
            keys_text(base_url, state_dir, controller.admin_key, f"127.0.0.1:{controller.port}"),
            flush=True,
        )

    given: GivenCertificate | None = None
    renewal: asyncio.Task[None] | None = None
    if controller.ca is not None:
        # The facade runs in this process: its certificate is made here, with
        # no token to leak, and renewed here.
        certificate = controller.ca.issue_direct(Identity(Role.FACADE, "serve"))
        given = GivenCertificate(certificate, f"127.0.0.1:{controller.mesh_port}")
        renewal = asyncio.create_task(controller.ca.keep_renewed(certificate))
    else:
        facade_settings = facade_settings.model_copy(update={"insecure_plaintext": True})
    try:
        await serve_http(facade_settings, on_started=announce, given=given)
    finally:
        if renewal is not None:
            renewal.cancel()
        log.info("stopping the controller and the instances it started")
        await controller.stop()
