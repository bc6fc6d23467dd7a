"""The node agent's settings: flags, KSCOPE_* environment variables, defaults."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from node_agent.queue import QueueLimits

_DEFAULT_VLLM_PYTHON = Path(__file__).resolve().parent.parent / ".venv-vllm" / "bin" / "python"


class AgentSettings(BaseSettings):
    """Everything one node agent is configured with."""

    model_config = SettingsConfigDict(
        env_prefix="KSCOPE_", extra="ignore", use_attribute_docstrings=True
    )

    controller: str = "127.0.0.1:50051"
    """host:port of the controller's public gRPC port (enrollment, discovery)."""
    instance_id: str = ""
    """The instance this agent was launched for (set by the launcher)."""
    enroll_token: SecretStr = SecretStr("")
    """One-time enrollment token (KSCOPE_ENROLL_TOKEN) traded for this agent's
    certificate; from the environment or token_file, never a flag."""
    tls_ca: str = ""
    """The cluster CA certificate (KSCOPE_TLS_CA): PEM text, or a file holding it."""
    insecure_plaintext: bool = False
    """Debugging only: talk to a plaintext controller; serve without TLS."""
    engine: str = "vllm"
    """vllm, openai or mlx_vlm."""
    model: str = Field(default="", min_length=0)
    """The model name clients use."""
    model_path: str = ""
    """Weights directory for vllm and mlx_vlm."""
    upstream_url: str = ""
    """Base URL (ending in /v1) of a running OpenAI-compatible server (openai engine)."""
    upstream_api_key: SecretStr = SecretStr("")
    """API key the upstream server wants, if any (openai engine)."""
    upstream_model: str = ""
    """The upstream's name for the model; defaults to `model`."""
    upstream_ca_bundle: str = ""
    """PEM file of the CA(s) an https upstream_url's certificate is verified
    against, instead of the system's trust store (openai engine)."""
    upstream_insecure_skip_verify: bool = False
    """Do not verify an https upstream_url's certificate at all (testing only;
    excludes upstream_ca_bundle)."""
    engine_args: list[str] = Field(default_factory=list)
    """Extra engine flags (vllm serve arguments)."""
    aliases: list[str] = Field(default_factory=list)
    """Other names clients may use for the model; the engine answers to them too
    (vllm: more --served-model-name; openai: the agent names the upstream's model)."""
    lora_modules: list[str] = Field(default_factory=list)
    """LoRA adapters the vllm engine serves, each NAME=PATH; clients use NAME as
    the model."""
    capabilities_refresh_s: float = Field(default=30.0, gt=0)
    """How often the agent asks its engine again what it can do (LoRA adapters
    loaded at run time), once it is ready."""
    host: str = "127.0.0.1"
    """Address InferenceService binds; `@node`: the address this machine's host
    name resolves to (what SLURM jobs use, rather than every interface)."""
    advertise_host: str = ""
    """Host the facades dial; defaults to host (the hostname for 0.0.0.0)."""
    port: int = Field(default=0, ge=0, le=65535)
    """InferenceService port; 0 picks a free one."""
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535,
        validation_alias=AliasChoices("kscope_agent_metrics_port", "metrics_port"),
    )  # fmt: skip
    """Serve Prometheus /metrics on this HTTP port (KSCOPE_AGENT_METRICS_PORT);
    0 picks a free one; unset: off."""
    metrics_port_file: Path | None = Field(
        default=None,
        validation_alias=AliasChoices("kscope_agent_metrics_port_file", "metrics_port_file"),
    )
    """When set, the bound /metrics port is written here."""
    vllm_python: str = (
        str(_DEFAULT_VLLM_PYTHON) if _DEFAULT_VLLM_PYTHON.exists() else sys.executable
    )
    """Python interpreter with vLLM installed."""
    engine_startup_timeout_s: float = Field(default=900.0, gt=0)
    """The engine must answer health within this long."""
    agent_orphan_timeout_s: float = Field(
        default=900.0, gt=0,
        validation_alias=AliasChoices("kscope_agent_orphan_timeout_s", "agent_orphan_timeout_s"),
    )  # fmt: skip
    """KSCOPE_AGENT_ORPHAN_TIMEOUT_S: with no controller for this long (it was
    killed, its job ended) the agent drains and exits, taking its engine with it.
    Long enough for a controller restart, which agents survive."""
    drain_timeout_s: float = Field(default=300.0, gt=0)
    """In-flight requests get this long to finish when draining."""
    health_interval_s: float = Field(default=1.0, gt=0)
    """How often the engine's health is checked once ready."""
    upstream_timeout_s: float = Field(default=600.0, gt=0)
    """Longest wait for the engine's next bytes (its headers, or the next piece
    of its answer); the engine connection is closed after it."""
    max_concurrency: int | None = Field(default=None, ge=0)
    """Requests the engine works on at once; more wait in the queue. 0: no limit;
    unset: the engine's default (1 for mlx_vlm, no limit for vllm and openai)."""
    queue_size: int = Field(default=100, ge=0)
    """Requests that may wait for the engine; one more is refused with 429."""
    queue_timeout_s: float = Field(default=300.0, gt=0)
    """Longest a request waits in the queue before it fails with 504."""
    image_max_bytes: int = Field(default=20 * 1024 * 1024, gt=0)
    """Largest image a request may carry or name (mlx_vlm)."""
    image_fetch_timeout_s: float = Field(default=10.0, gt=0)
    """Longest fetching one image URL may take (mlx_vlm)."""
    host_agent: bool = False
    """Run as a host agent: no instance of its own; the controller asks it to
    load the models it offers (host_models) and to unload them."""
    host_models: str = ""
    """The models a host agent offers: comma-separated NAME=PATH entries, or
    directories whose model subdirectories are offered under their names."""
    host_state_dir: Path = Path("~/.kscope/host")
    """Where a host agent keeps its instances' logs."""
    token_file: Path | None = None
    """Read the enrollment token (and the CA) from this file, readable by its
    owner only, instead of the environment; how launchd starts a host agent."""

    @model_validator(mode="after")
    def _one_way_to_trust_the_upstream(self) -> AgentSettings:
        if self.upstream_ca_bundle and self.upstream_insecure_skip_verify:
            raise ValueError(
                "upstream_ca_bundle and upstream_insecure_skip_verify exclude each other"
            )
        return self

    @field_validator("engine_args", "aliases", "lora_modules", mode="before")
    @classmethod
    def _parse_json_list(cls, value: object) -> object:
        if isinstance(value, str):
            parsed = json.loads(value) if value.strip() else []
            if not isinstance(parsed, list) or not all(isinstance(a, str) for a in parsed):
                raise ValueError("must be a JSON list of strings")
            return parsed
        return value

    def bind_host(self) -> str:
        """The address to bind (`@node` resolved)."""
        if self.host != "@node":
            return self.host
        try:
            return socket.gethostbyname(socket.gethostname())
        except OSError:
            return "127.0.0.1"

    @property
    def served_model(self) -> str:
        return self.model or Path(self.model_path).name or "default"

    def queue_limits(self) -> QueueLimits:
        """The request queue in front of the engine."""
        default = 1 if self.engine == "mlx_vlm" else 0
        return QueueLimits(
            max_concurrency=default if self.max_concurrency is None else self.max_concurrency,
            max_queue_size=self.queue_size,
            timeout_s=self.queue_timeout_s,
        )
