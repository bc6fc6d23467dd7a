"""Build the engine a settings object asks for."""

from __future__ import annotations

from node_agent.engines.base import Engine
from node_agent.engines.mlx_vlm import MlxVlmEngine
from node_agent.engines.openai_upstream import OpenAIUpstream
from node_agent.engines.vllm import VllmEngine
from node_agent.images import ImageLimits
from node_agent.settings import AgentSettings


class UnknownEngine(ValueError):
    """The settings name an engine this agent does not have."""


def make_engine(settings: AgentSettings) -> Engine:
    if settings.engine == "openai":
        if not settings.upstream_url:
            raise UnknownEngine("engine 'openai' needs --upstream-url")
        return OpenAIUpstream(
            settings.upstream_url,
            settings.served_model,
            upstream_model=settings.upstream_model,
            timeout_s=settings.upstream_timeout_s,
            api_key=settings.upstream_api_key.get_secret_value(),
        )
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
