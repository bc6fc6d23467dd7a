"""The facade's settings: flags, environment variables, defaults."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from facade.portal.settings import PortalSettings


class FacadeSettings(BaseSettings):
    """Everything one facade process is configured with."""

    model_config = SettingsConfigDict(
        env_prefix="KSCOPE_", extra="ignore", populate_by_name=True, use_attribute_docstrings=True
    )

    host: str = "127.0.0.1"
    """Address the HTTP server binds."""
    port: int = Field(
        default=8000, ge=0, le=65535, validation_alias=AliasChoices("KSCOPE_PORT", "PROXY_PORT")
    )
    """HTTP port (PROXY_PORT, the original proxy's variable, works too); 0 picks one."""
    port_file: Path | None = None
    """When set, the bound port is written here once the server listens."""
    base_url: str = Field(
        default="", validation_alias=AliasChoices("KSCOPE_BASE_URL", "PROXY_BASE_URL")
    )
    """The public URL users reach this facade at (PROXY_BASE_URL works too), for messages."""
    controller: str = "127.0.0.1:50051"
    """host:port of the controller's public port (enrollment, discovery)."""
    enroll_token: SecretStr | None = None
    """This facade's enrollment token (KSCOPE_ENROLL_TOKEN; `kscope facades add
    NAME` prints one): traded for its certificate at start. Environment only."""
    tls_ca: str = ""
    """The cluster CA certificate (KSCOPE_TLS_CA): PEM text, or a file holding it."""
    insecure_plaintext: bool = False
    """Debugging only: talk to a plaintext controller and agents (no TLS)."""
    api_key: SecretStr | None = None
    """A static key accepted beside the controller's stored keys (KSCOPE_API_KEY;
    `kscope serve --api-key`). Environment only."""
    require_key: bool = True
    """Every /v1 request must carry a valid key (a stored one or api_key); false
    leaves /v1 open (a trusted network, benchmarks)."""
    key_cache_ttl_s: float = Field(default=30.0, gt=0)
    """How long the controller's answer about a key is reused; revocations are
    pushed and take effect at once regardless."""
    portal: PortalSettings = Field(default_factory=PortalSettings)
    """The web portal (KSCOPE_PORTAL_* variables)."""
    max_body_bytes: int = Field(default=16 * 1024 * 1024, gt=0)
    """Larger request bodies are refused with 413."""
    request_timeout_s: float = Field(default=600.0, ge=0)
    """The longest one request may take from when it is sent to an instance
    (KSCOPE_REQUEST_TIMEOUT_S; a cold start's wait is not counted); a stream past
    it ends with an SSE error event (504) and [DONE]. 0: no cap."""
    stream_idle_timeout_s: float = Field(default=120.0, gt=0)
    """A stream that, once its first chunk came, gets no chunk for this long
    (KSCOPE_STREAM_IDLE_TIMEOUT_S) ends with an SSE error event (504) and
    [DONE], and its engine request is aborted; so does one whose client stopped
    reading for this long. Before the first chunk (a queued request) only
    request_timeout_s and the agent's queue_timeout_s apply."""
    multiplex: bool = True
    """Carry requests to each agent over one shared Multiplex stream (fast);
    false: one gRPC call per request (what grpcurl users see)."""
    ensure_timeout_s: float = Field(default=0.05, gt=0)
    """How long a cold request waits for the controller's EnsureModel answer."""
    cold_wait_s: float = Field(default=0.0, ge=0)
    """How long a request for a model without a READY instance is held for one
    when it sends no X-KScope-Wait header; 0: answered 503 + Retry-After at once."""
    max_wait_s: float = Field(default=600.0, ge=0)
    """The longest wait an X-KScope-Wait header may ask for."""
    max_waiting_per_model: int = Field(default=100, ge=0)
    """Requests that may wait for one cold model at once; more get 429."""
    wait_progress_interval_s: float = Field(default=5.0, gt=0)
    """How often a waiting streaming request gets an SSE comment saying what is happening."""
    access_log: bool = False
    """Write one JSON line per /v1 request (id, path, model, key id and owner,
    status, duration, time to first token, tokens; never a secret) to standard
    error or access_log_path (KSCOPE_ACCESS_LOG)."""
    access_log_path: Path | None = None
    """Append the access log to this file instead of standard error."""
    default_model: str = ""
    """When set, requests that name no model, or one the catalog does not have,
    go to this model (`kscope serve --model-type mlx_vlm` sets it, as the
    single-model MLX server ignored the name)."""
