"""The model catalog: which models exist and how to run them, read from TOML."""

from __future__ import annotations

import dataclasses
import re
import ssl
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kscope_common.capabilities import Capabilities
from kscope_common.limits import Limits


class CatalogError(ValueError):
    """The catalog file is missing, unreadable or invalid."""


class EngineKind(StrEnum):
    """What serves a model inside a node agent."""

    VLLM = "vllm"
    """vLLM's OpenAI server, started and supervised by the agent."""
    OPENAI = "openai"
    """An OpenAI-compatible server that already runs; the agent attaches by URL."""
    MLX_VLM = "mlx_vlm"
    """MLX-VLM in the agent's process (Apple silicon, or mlx[cpu] on Linux)."""


_SBATCH_VALUE = r"^[^\s#'\"]*$"
"""One #SBATCH value: no whitespace, quotes or comment characters (no injection)."""


class SlurmSpec(BaseModel):
    """How the slurm launcher asks SLURM for a model's jobs (`[models.slurm]`).
    Empty fields leave the choice to the cluster's defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    partition: str = Field(default="", pattern=_SBATCH_VALUE)
    """--partition."""
    qos: str = Field(default="", pattern=_SBATCH_VALUE)
    """--qos; default: the controller's worker_slurm_qos (WORKER_SLURM_QOS)."""
    account: str = Field(default="", pattern=_SBATCH_VALUE)
    """--account."""
    gres: str = Field(default="", pattern=_SBATCH_VALUE)
    """--gres, e.g. gpu:1 or gpu:a100:2."""
    cpus: int | None = Field(default=None, ge=1)
    """--cpus-per-task."""
    memory: str = Field(default="", pattern=r"^$|^[0-9]+[KMGT]?$")
    """--mem, e.g. 64G."""
    time_limit: str = Field(default="", pattern=r"^$|^(\d+-)?\d+(:\d{1,2}){0,2}$")
    """--time in SLURM's format (minutes, H:MM:SS, D-HH:MM…). Jobs are rotated
    before it runs out."""
    extra_sbatch: tuple[str, ...] = ()
    """More #SBATCH options, one per item, e.g. "--constraint=a100"."""
    setup: tuple[str, ...] = ()
    """Shell lines run before the agent starts (module load, venv activation)."""

    @property
    def time_limit_s(self) -> float | None:
        """The time limit in seconds; None when the cluster's default applies."""
        return parse_duration(self.time_limit) if self.time_limit else None

    @model_validator(mode="after")
    def _one_line_each(self) -> SlurmSpec:
        for option in self.extra_sbatch:
            if not option.startswith("-") or "\n" in option or "\r" in option:
                raise ValueError(f"extra_sbatch {option!r}: one option per item, starting with -")
        for line in self.setup:
            if "\n" in line or "\r" in line or "\0" in line:
                raise ValueError(f"setup {line!r}: one shell line per item")
        return self


def parse_duration(text: str) -> float | None:
    """SLURM's [days-][hours:]minutes:seconds (or minutes) in seconds; None for
    UNLIMITED, NOT_SET, INVALID and anything else that is not a duration."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if match is None:
        return None
    days, a, b, c = match.groups()
    parts = [int(a)] + [int(p) for p in (b, c) if p is not None]
    if days is not None:
        # days-hours[:minutes[:seconds]]
        parts += [0] * (3 - len(parts))
        h, m, s = parts
        return float(int(days) * 86400 + h * 3600 + m * 60 + s)
    if len(parts) == 1:
        return float(parts[0] * 60)  # minutes
    if len(parts) == 2:
        return float(parts[0] * 60 + parts[1])  # minutes:seconds
    return float(parts[0] * 3600 + parts[1] * 60 + parts[2])


MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:/@-]*$"
"""What a model name (and an alias, and an adapter's name) may look like."""

EndpointName = Literal[
    "chat_completions", "completions", "embeddings", "responses", "tokenize", "score",
    "rerank", "pooling", "classify", "transcription",
]  # fmt: skip
"""The inference endpoints an instance may serve (agent.proto ApiEndpoint)."""
ModalityName = Literal["text", "image", "audio", "video"]


class KeyLimits(BaseModel):
    """Limits on each key's use of one model (`[models.key_limits]`), beside
    the key's own and its owner's (docs/usage.md); 0: no limit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_minute: int = Field(default=0, ge=0)
    tokens_per_minute: int = Field(default=0, ge=0)
    max_concurrent: int = Field(default=0, ge=0)
    daily_tokens: int = Field(default=0, ge=0)

    def limits(self) -> Limits:
        return Limits(**self.model_dump())


class LoraModule(BaseModel):
    """One LoRA adapter of a vllm model (`lora_modules = [{name = "…", path = "…"}]`).
    Clients use its name as a model name; vLLM serves it on the base model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, pattern=MODEL_NAME)
    """The model name clients use for the adapter."""
    path: str = Field(min_length=1)
    """The adapter's directory (adapter_config.json + adapter_model.safetensors),
    an absolute path where the agents run."""

    @model_validator(mode="after")
    def _absolute(self) -> LoraModule:
        if not Path(self.path).is_absolute():
            raise ValueError(f"lora module {self.name!r}: path must be absolute")
        return self


class DeclaredCapabilities(BaseModel):
    """What the catalog says a model can do (`[models.capabilities]`), over what
    its agents learn from the engine: each field given replaces theirs. For
    `openai` upstreams, whose /v1/models says little, this is the way to tell
    the facade what to refuse early."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoints: tuple[EndpointName, ...] | None = None
    """The inference endpoints it serves (chat_completions, completions,
    embeddings, responses, tokenize, score, rerank, pooling, classify, transcription)."""
    input_modalities: tuple[ModalityName, ...] | None = None
    """The kinds of input it accepts: text, image, audio, video."""
    tools: bool | None = None
    """It takes `tools` (function calling)."""
    structured_output: bool | None = None
    """It honours response_format json_schema / json_object."""
    max_model_len: int | None = Field(default=None, gt=0)
    """Its context length in tokens (prompt plus completion)."""

    def over(self, reported: Capabilities | None, engine: str) -> Capabilities:
        """These declarations over what an agent reported (None: nothing yet)."""
        base = reported or Capabilities(engine=engine)
        changes: dict[str, Any] = {}
        if self.endpoints is not None:
            changes["endpoints"] = frozenset(self.endpoints)
        if self.input_modalities is not None:
            changes["input_modalities"] = frozenset(self.input_modalities)
        if self.tools is not None:
            changes["tools"] = self.tools
        if self.structured_output is not None:
            changes["structured_output"] = self.structured_output
        if self.max_model_len is not None:
            changes["max_model_len"] = self.max_model_len
        return dataclasses.replace(base, **changes)


class ModelSpec(BaseModel):
    """One catalog entry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, pattern=MODEL_NAME)
    """The name clients put in the request's `model` field."""
    aliases: tuple[str, ...] = ()
    """Other names clients may use for this model ("gpt-4o-mini"); a request
    naming one goes to this model's instances, whose engine answers to it too."""
    lora_modules: tuple[LoraModule, ...] = ()
    """LoRA adapters the vllm engine serves beside the base model, each a model
    name of its own (`[{name = "sql-lora", path = "/models/sql-lora"}]`)."""
    key_limits: KeyLimits = KeyLimits()
    """What each key may use of this model (requests and tokens per minute,
    requests at once, tokens per UTC day), whatever limits the key has itself."""
    capabilities: DeclaredCapabilities | None = None
    """What the model can do, where the engine cannot tell (openai upstreams)
    or should be overruled; unset: what the agents learn from the engine."""
    engine: EngineKind = EngineKind.VLLM
    """Which engine serves it."""
    model_path: str = ""
    """Weights directory (vllm, mlx_vlm)."""
    upstream_url: str = ""
    """Base URL of a running OpenAI-compatible server, ending in /v1 (openai engine)."""
    upstream_model: str = ""
    """The model name the upstream knows; defaults to `name`."""
    upstream_ca_bundle: str = ""
    """An https upstream_url's certificate is verified against the CAs in this
    PEM file (an absolute path, where the agents run too) instead of the
    system's trust store."""
    upstream_insecure_skip_verify: bool = False
    """Do not verify an https upstream_url's certificate at all (testing only);
    giving upstream_ca_bundle too is an error."""
    launcher: str = "local"
    """Which launcher starts its instances: local (a process here), slurm, or
    host (a host agent that offers the model, e.g. a Mac under launchd)."""
    min_replicas: int = Field(default=0, ge=0)
    """Instances kept running even without traffic."""
    max_replicas: int = Field(default=1, ge=1)
    """Never more instances than this."""
    engine_args: tuple[str, ...] = ()
    """Extra command-line arguments for the engine (vllm serve flags)."""
    env: dict[str, str] = Field(default_factory=dict)
    """Extra environment for the agent and its engine."""
    startup_timeout_s: float = Field(default=900.0, gt=0)
    """An instance not READY this long after launch is FAILED."""
    expected_startup_s: float = Field(default=40.0, gt=0)
    """How long a start usually takes; the base of Retry-After for a cold model."""
    max_concurrency: int | None = Field(default=None, ge=0)
    """Requests one instance works on at once; more wait in its queue. 0: no
    limit; unset: the engine's default (1 for mlx_vlm, no limit otherwise)."""
    queue_size: int | None = Field(default=None, ge=0)
    """Requests that may wait in an instance's queue (agent default 100); more get 429."""
    queue_timeout_s: float | None = Field(default=None, gt=0)
    """Longest a request waits in the queue before a 504 (agent default 300 s)."""
    idle_timeout_s: float | None = Field(default=None, gt=0)
    """Without requests this long, instances above min_replicas are drained (a
    host agent unloads the model); unset: they stay once launched."""
    target_in_flight: float | None = Field(default=None, gt=0)
    """Requests (in flight and queued) one instance should carry; the reconciler
    launches more instances, up to max_replicas, while the model carries more per
    instance, and drains them when it carries less. Unset: no scaling by load."""
    scale_up_window_s: float = Field(default=30.0, ge=0)
    """Load must call for more instances this long before any is launched."""
    scale_down_window_s: float = Field(default=300.0, ge=0)
    """Load must call for fewer instances this long before any is drained."""
    slurm: SlurmSpec = Field(default_factory=SlurmSpec)
    """Job resources and setup for the slurm launcher."""

    @model_validator(mode="after")
    def _engine_needs_its_source(self) -> ModelSpec:
        if self.engine == EngineKind.OPENAI and not self.upstream_url:
            raise ValueError(f"model {self.name!r}: engine 'openai' needs upstream_url")
        self._check_upstream_tls()
        # Host agents find a model's weights on their own disk (they offer it by name).
        needs_path = self.engine != EngineKind.OPENAI and self.launcher != "host"
        if needs_path and not self.model_path:
            raise ValueError(f"model {self.name!r}: engine {self.engine.value!r} needs model_path")
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"model {self.name!r}: min_replicas > max_replicas")
        self._check_names()
        return self

    def _check_names(self) -> None:
        """Aliases look like model names; adapters only on vllm, which serves them."""
        for alias in self.aliases:
            if not re.fullmatch(MODEL_NAME, alias):
                raise ValueError(f"model {self.name!r}: alias {alias!r} is not a valid model name")
        if self.lora_modules and self.engine != EngineKind.VLLM:
            raise ValueError(
                f"model {self.name!r}: lora_modules need engine 'vllm' (it serves the adapters)"
            )

    @property
    def names(self) -> tuple[str, ...]:
        """Every name clients may use for it: its own, its aliases, its adapters'."""
        return (self.name, *self.aliases, *(m.name for m in self.lora_modules))

    def _check_upstream_tls(self) -> None:
        """The TLS settings: for an https upstream_url only, one of the two at
        most, and a CA bundle that exists and holds a PEM certificate."""
        if not (self.upstream_ca_bundle or self.upstream_insecure_skip_verify):
            return
        given = "upstream_ca_bundle" if self.upstream_ca_bundle else "upstream_insecure_skip_verify"
        if self.engine != EngineKind.OPENAI or not self.upstream_url.startswith("https://"):
            raise ValueError(f"model {self.name!r}: {given} needs an https:// upstream_url")
        if self.upstream_ca_bundle and self.upstream_insecure_skip_verify:
            raise ValueError(
                f"model {self.name!r}: upstream_ca_bundle and upstream_insecure_skip_verify "
                "exclude each other (verify against the bundle, or not at all)"
            )
        bundle = self.upstream_ca_bundle
        if not bundle:
            return
        if not Path(bundle).is_absolute():
            raise ValueError(f"model {self.name!r}: upstream_ca_bundle must be an absolute path")
        try:
            ssl.create_default_context(cafile=bundle)
        except (OSError, ssl.SSLError) as exc:  # missing, unreadable, or no PEM certificate
            raise ValueError(
                f"model {self.name!r}: upstream_ca_bundle {bundle!r} cannot be used: {exc}"
            ) from exc


class Catalog(BaseModel):
    """All models, keyed by name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: tuple[ModelSpec, ...] = ()

    @model_validator(mode="after")
    def _names_unique(self) -> Catalog:
        # Model names, aliases and adapter names share one namespace: clients
        # put any of them in `model`.
        names = [n for m in self.models for n in m.names]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate model names (aliases and adapters count): "
                             f"{', '.join(duplicates)}")  # fmt: skip
        return self

    def get(self, name: str) -> ModelSpec | None:
        """The model called `name`, or None."""
        for model in self.models:
            if model.name == name:
                return model
        return None

    def resolve(self, name: str) -> ModelSpec | None:
        """The model that `name` names: itself, an alias of it or one of its
        LoRA adapters; None when no model answers to it."""
        for model in self.models:
            if name in model.names:
                return model
        return None

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]


def parse_catalog(data: dict[str, Any], source: str = "catalog") -> Catalog:
    """Validate a catalog mapping (the parsed TOML), naming the bad field on error."""
    try:
        return Catalog.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise CatalogError(f"{source}: {problems}") from exc


def load_catalog(path: Path) -> Catalog:
    """Read and validate a catalog TOML file (`[[models]]` tables)."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise CatalogError(f"cannot read catalog {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"catalog {path} is not valid TOML: {exc}") from exc
    return parse_catalog(data, str(path))
