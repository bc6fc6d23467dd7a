"""The controller's settings: flags, KSCOPE_* environment variables, defaults."""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ControllerSettings(BaseSettings):
    """Everything the controller process is configured with."""

    model_config = SettingsConfigDict(
        env_prefix="KSCOPE_", extra="ignore", use_attribute_docstrings=True
    )

    host: str = "127.0.0.1"
    """Address the gRPC server binds (0.0.0.0 to reach agents on other nodes)."""
    port: int = Field(default=50051, ge=0, le=65535)
    """gRPC port; 0 picks a free one (see port_file)."""
    port_file: Path | None = None
    """When set, the bound port is written here once the server listens."""
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535,
        validation_alias=AliasChoices("kscope_controller_metrics_port", "metrics_port"),
    )  # fmt: skip
    """Serve Prometheus /metrics on this HTTP port (KSCOPE_CONTROLLER_METRICS_PORT,
    not inherited by agents); 0 picks a free one; unset: off."""
    metrics_host: str = "127.0.0.1"
    """Address the /metrics server binds."""
    metrics_port_file: Path | None = Field(
        default=None,
        validation_alias=AliasChoices("kscope_controller_metrics_port_file", "metrics_port_file"),
    )
    """When set, the bound /metrics port is written here."""
    min_update_interval_seconds: float = Field(
        default=10.0, gt=0,
        validation_alias=AliasChoices("min_update_interval_seconds", "kscope_min_update_interval"),
    )  # fmt: skip
    """Telemetry is sampled at most this often (MIN_UPDATE_INTERVAL_SECONDS)."""
    max_num_historic_records: int = Field(
        default=1000, ge=1,
        validation_alias=AliasChoices("max_num_historic_records", "kscope_max_historic_records"),
    )  # fmt: skip
    """Telemetry records kept per model and per instance (MAX_NUM_HISTORIC_RECORDS)."""
    telemetry_callback_url: str = Field(
        default="",
        validation_alias=AliasChoices("telemetry_callback_url", "kscope_telemetry_callback_url"),
    )
    """Each telemetry sample is POSTed here as JSON when set (TELEMETRY_CALLBACK_URL)."""
    advertise_address: str = ""
    """host:port agents dial; defaults to host:port (the hostname for 0.0.0.0)."""
    state_dir: Path = Path("~/.kscope")
    """Where the SQLite database, the CA (tls/) and agent logs live (mode 700)."""
    catalog: Path | None = None
    """Model catalog (TOML). Without it, the catalog stored last time is used."""
    mesh_host: str = ""
    """Address the mutual-TLS port (agents, facades) binds; default: host."""
    mesh_port: int = Field(default=0, ge=0, le=65535)
    """The mutual-TLS port; 0 picks a free one. Processes find it through the
    public port (IdentityService.Discover), so only `port` must be known."""
    mesh_advertise_address: str = ""
    """host:port agents and facades dial for the mutual-TLS port; default:
    the advertised host and the bound mesh port."""
    tls_ca_cert: Path | None = None
    """The site's CA certificate (PEM; KSCOPE_TLS_CA_CERT); with tls_ca_key.
    Default: a CA the controller makes in state_dir/tls on first start."""
    tls_ca_key: Path | None = None
    """The site's CA private key (PEM, EC P-256; KSCOPE_TLS_CA_KEY)."""
    tls_cert_lifetime_s: float = Field(default=12 * 3600.0, gt=0)
    """Lifetime of the certificates the CA issues; renewed two thirds in."""
    tls_server_names: list[str] = Field(default_factory=list)
    """Extra DNS names or addresses written in the controller's certificate (the
    names operators dial with grpcurl; localhost, the host name and the bound
    addresses are always in)."""
    insecure_plaintext: bool = False
    """Debugging only: no TLS, no certificates, no identity checks on agents and
    facades (API keys are still checked). Logged loudly."""
    reconcile_interval_s: float = Field(default=1.0, gt=0)
    """Seconds between reconcile passes when nothing wakes the loop earlier."""
    drain_timeout_s: float = Field(default=300.0, gt=0)
    """A draining instance is stopped by force after this long."""
    report_interval_s: float = Field(default=1.0, gt=0)
    """How often agents send load reports."""
    agent_stale_after_s: float = Field(default=10.0, gt=0)
    """An agent silent this long is lost."""
    reconnect_grace_s: float = Field(default=15.0, ge=0)
    """After a restart, how long known agents have to reconnect before FAILED."""
    stop_instances_on_exit: bool = True
    """On a clean shutdown, stop the instances this controller started (local
    processes; SLURM jobs are scancelled). Turn off to keep SLURM jobs running
    across a planned restart: the restarted controller adopts them."""
    tie_local_agents: bool = False
    """Local agents die with this controller, even when it is killed with
    SIGKILL (what `kscope serve` wants). Off: they outlive a restart and
    re-attach, and exit after agent_orphan_timeout_s without a controller."""
    in_process_agents: bool = False
    """Local agents whose engine is an HTTP server of its own (vllm, openai) run
    in this process, and a facade in this process calls them without gRPC
    (`kscope serve`; docs/architecture.md "In-process agents")."""
    agent_python: str = sys.executable
    """Python interpreter that runs `node_agent` for the local launcher."""
    key_default_ttl_days: float = Field(default=180.0, gt=0)
    """Lifetime of an API key created without an explicit expiry."""
    key_max_ttl_days: float = Field(default=3650.0, gt=0)
    """The longest lifetime an API key may be given."""
    usage_retention_days: float = Field(default=400.0, gt=0)
    """How long hourly usage totals per key and model are kept (docs/usage.md)."""

    # --- the slurm launcher (docs/slurm.md). The original proxy's variables
    # (SSH_HOST, SSH_PORT, SSH_USERNAME, WORKER_SLURM_QOS) keep working beside
    # their KSCOPE_ names; the aliases match environment names case-insensitively. ---
    ssh_host: str = Field(default="", validation_alias=AliasChoices("kscope_ssh_host", "ssh_host"))
    """Login node to submit jobs through (SSH_HOST). Empty: run sbatch on this
    machine (the controller runs on a login node)."""
    ssh_port: int = Field(
        default=22, ge=1, le=65535, validation_alias=AliasChoices("kscope_ssh_port", "ssh_port")
    )
    """SSH port of the login node (SSH_PORT)."""
    ssh_username: str = Field(
        default="", validation_alias=AliasChoices("kscope_ssh_username", "ssh_username")
    )
    """User to log in as (SSH_USERNAME); default: the controller's own user."""
    ssh_key: Path | None = None
    """Private key for key authentication; default: ~/.ssh/id_* and the ssh agent."""
    ssh_known_hosts: Path | None = None
    """known_hosts file the login node's host key is checked against;
    default: ~/.ssh/known_hosts."""
    ssh_insecure_no_host_key_check: bool = False
    """Accept any host key (man-in-the-middle attacks go unnoticed). Off unless
    the operator turns it on explicitly."""
    ssh_connect_timeout_s: float = Field(default=10.0, gt=0)
    """Longest an SSH connection attempt may take."""
    slurm_command_timeout_s: float = Field(default=30.0, gt=0)
    """Longest one sbatch, squeue, sacct or scancel may take."""
    worker_slurm_qos: str = Field(
        default="", validation_alias=AliasChoices("kscope_worker_slurm_qos", "worker_slurm_qos")
    )
    """QOS for jobs whose catalog entry names none (WORKER_SLURM_QOS)."""
    slurm_poll_interval_s: float = Field(default=2.0, gt=0)
    """At most one squeue per this many seconds, for all of KScope's jobs together."""
    slurm_rotation_lead_s: float = Field(default=600.0, ge=0)
    """Submit a replacement this long before a running job's time limit; the old
    job is drained once the replacement is READY. 0 turns rotation off."""
    slurm_job_prefix: str = Field(default="kscope", pattern=r"^[A-Za-z0-9_.-]+$")
    """Job names are PREFIX-INSTANCE_ID; a restarted controller finds its jobs by them."""
    slurm_agent_python: str = ""
    """Python with KScope installed, as a path on the compute nodes; default: agent_python."""
    slurm_agent_host: str = "@node"
    """Address the agent inside a job binds: `@node` (the node's own address, as
    its host name resolves), or an address such as 0.0.0.0 (every interface)."""
    slurm_log_dir: str = "kscope-logs"
    """Directory for the jobs' output on the cluster; relative to the SSH user's home."""

    @property
    def state_path(self) -> Path:
        return self.state_dir.expanduser()

    @property
    def tls_dir(self) -> Path:
        """The CA (its key mode 600) and ca.pem, which operators copy."""
        return self.state_path / "tls"

    @property
    def database_path(self) -> Path:
        return self.state_path / "kscope.db"

    @property
    def admin_key_path(self) -> Path:
        """Where the bootstrap admin key is written (mode 600) at first start."""
        return self.state_path / "admin-key"
