"""Build the engine a settings object asks for, and what learns its capabilities."""

from __future__ import annotations

from node_agent.capabilities import Discovery, MlxDiscovery, UpstreamDiscovery, VllmDiscovery
from node_agent.engines.base import Engine
from node_agent.engines.mlx_vlm import MlxVlmEngine
from node_agent.engines.openai_upstream import OpenAIUpstream, tls_context
from node_agent.engines.vllm import VllmEngine
from node_agent.images import ImageLimits
from node_agent.settings import AgentSettings


class UnknownEngine(ValueError):
    """The settings name an engine this agent does not have, or one it cannot
    be built with (a missing or bad URL, CA bundle, weights directory)."""


def make_engine(settings: AgentSettings) -> Engine:
    if settings.engine == "openai":
        if not settings.upstream_url:
            raise UnknownEngine("engine 'openai' needs --upstream-url")
        # With aliases, the upstream knows none of them: every body names its
        # model to it (`served_model` "" makes the engine rename always).
        aliased = bool(settings.aliases)
        try:
            return OpenAIUpstream(
                settings.upstream_url,
                "" if aliased else settings.served_model,
                upstream_model=(settings.upstream_model or settings.served_model)
                if aliased
                else settings.upstream_model,
                timeout_s=settings.upstream_timeout_s,
                api_key=settings.upstream_api_key.get_secret_value(),
                ca_bundle=settings.upstream_ca_bundle,
                insecure_skip_verify=settings.upstream_insecure_skip_verify,
            )
        except ValueError as exc:  # a bad URL or CA bundle: refused at start, named
            raise UnknownEngine(f"engine 'openai': {exc}") from exc
    if settings.engine == "vllm":
        if not settings.model_path:
            raise UnknownEngine("engine 'vllm' needs --model-path")
        for module in settings.lora_modules:
            name, _, path = module.partition("=")
            if not (name and path):
                raise UnknownEngine(
                    f"engine 'vllm': lora_modules entry {module!r} is not NAME=PATH"
                )
        return VllmEngine(
            settings.vllm_python,
            settings.model_path,
            settings.served_model,
            settings.engine_args,
            timeout_s=settings.upstream_timeout_s,
            aliases=settings.aliases,
            lora_modules=settings.lora_modules,
            instance_id=settings.instance_id,
        )
    if settings.engine == "mlx_vlm":
        if not settings.model_path:
            raise UnknownEngine("engine 'mlx_vlm' needs --model-path")
        return MlxVlmEngine(
            settings.model_path,
            settings.served_model,
            ImageLimits(
                max_bytes=settings.image_max_bytes, timeout_s=settings.image_fetch_timeout_s
            ),
        )
    raise UnknownEngine(f"unknown engine {settings.engine!r} (known: vllm, openai, mlx_vlm)")


def make_discovery(settings: AgentSettings, engine: Engine) -> Discovery | None:
    """What asks `engine` what it can do (node_agent/capabilities.py); None for
    an engine this agent does not know how to ask."""
    if isinstance(engine, VllmEngine):
        return VllmDiscovery(
            engine.root, engine.api_key, settings.served_model, engine.engine_args,
            settings.model_path,
        )  # fmt: skip
    if isinstance(engine, MlxVlmEngine):
        return MlxDiscovery(settings.model_path)
    if isinstance(engine, OpenAIUpstream):
        tls = None
        if settings.upstream_url.startswith("https://"):
            tls = tls_context(settings.upstream_ca_bundle, settings.upstream_insecure_skip_verify)
        return UpstreamDiscovery(
            engine.url, settings.upstream_model or settings.served_model,
            settings.upstream_api_key.get_secret_value(), tls,
        )  # fmt: skip
    return None
