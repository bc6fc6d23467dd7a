"""The controller's settings: flags, KSCOPE_* environment variables, defaults."""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class ControllerSettings(BaseSettings):
    """Everything the controller process is configured with."""

    model_config = SettingsConfigDict(env_prefix="KSCOPE_", extra="ignore")

    host: str = "127.0.0.1"
    """Address the gRPC server binds (0.0.0.0 to reach agents on other nodes)."""
    port: int = Field(default=50051, ge=0, le=65535)
    """gRPC port; 0 picks a free one (see port_file)."""
    port_file: Path | None = None
    """When set, the bound port is written here once the server listens."""
    advertise_address: str = ""
    """host:port agents dial; defaults to host:port (the hostname for 0.0.0.0)."""
    state_dir: Path = Path("~/.kscope")
    """Where the SQLite database, the registration token and agent logs live."""
    catalog: Path | None = None
    """Model catalog (TOML). Without it, the catalog stored last time is used."""
    registration_token: SecretStr | None = None
    """Token agents must present; default: read or create state_dir/registration-token."""
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
    """On a clean shutdown, stop the local instances this controller started."""
    agent_python: str = sys.executable
    """Python interpreter that runs `node_agent` for the local launcher."""

    @property
    def state_path(self) -> Path:
        return self.state_dir.expanduser()

    @property
    def database_path(self) -> Path:
        return self.state_path / "kscope.db"

    def resolve_token(self) -> str:
        """The registration token; created (mode 600) in state_dir on first use."""
        if self.registration_token is not None:
            return self.registration_token.get_secret_value()
        path = self.state_path / "registration-token"
        if path.exists():
            return path.read_text().strip()
        path.parent.mkdir(parents=True, exist_ok=True)
        token = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        return token
