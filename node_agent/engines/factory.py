"""Build the engine a settings object asks for."""

from __future__ import annotations

from node_agent.engines.base import Engine
from node_agent.engines.mlx_vlm import MlxVlmEngine
from node_agent.engines.openai_upstream import OpenAIUpstream
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
        try:
            return OpenAIUpstream(
                settings.upstream_url,
                settings.served_model,
                upstream_model=settings.upstream_model,
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
        return VllmEngine(
            settings.vllm_python,
            settings.model_path,
            settings.served_model,
            settings.engine_args,
            timeout_s=settings.upstream_timeout_s,
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
