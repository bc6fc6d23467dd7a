"""The portal's settings (KSCOPE_PORTAL_* environment variables)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class PortalSettings(BaseSettings):
    """How the portal logs people in and talks to the controller about keys.

    With `ldap_url` set, users log in against LDAP; otherwise against the local
    users file (`kscope users add`)."""

    model_config = SettingsConfigDict(
        env_prefix="KSCOPE_PORTAL_", extra="ignore", use_attribute_docstrings=True
    )

    enabled: bool = True
    """Serve the portal under /portal."""
    service_key: SecretStr | None = None
    """An admin API key the portal uses to create, list and revoke users' keys."""
    session_secret: SecretStr | None = None
    """Signs session cookies; every facade behind one load balancer needs the same.
    Default: random per process (sessions end when the facade restarts)."""
    session_max_age_s: int = Field(default=8 * 3600, gt=0)
    """A login lasts this long."""
    secure_cookie: bool | None = None
    """Mark the session cookie Secure; default: when base_url is https."""
    key_default_days: int = Field(default=180, gt=0)
    """The expiry the key form proposes."""
    admin_users: list[str] = Field(default_factory=list)
    """Login names that also see everyone's usage per owner on the usage page
    (nothing else changes for them). A JSON list, in the environment too:
    KSCOPE_PORTAL_ADMIN_USERS='["alice", "bob"]'."""
    users_file: Path = Path("~/.kscope/users.toml")
    """Local users (salted scrypt hashes), used when no LDAP server is configured."""

    ldap_url: str = ""
    """ldap://host:389 or ldaps://host:636; empty: local users."""
    ldap_start_tls: bool = False
    """Upgrade an ldap:// connection with StartTLS before binding."""
    ldap_ca_file: Path | None = None
    """CA certificates the LDAP server's certificate is checked against."""
    ldap_user_dn_template: str = ""
    """Bind directly as this DN, e.g. uid={username},ou=people,dc=example,dc=org."""
    ldap_bind_dn: str = ""
    """Search-then-bind: the service account that searches for the user's DN."""
    ldap_bind_password: SecretStr | None = None
    """The service account's password."""
    ldap_search_base: str = ""
    """Search-then-bind: where users live."""
    ldap_user_filter: str = "(uid={username})"
    """Search-then-bind: the filter; {username} is escaped before it is filled in."""
    ldap_required_group: str = ""
    """DN of a group (groupOfNames, groupOfUniqueNames or posixGroup) users must be in."""
    ldap_timeout_s: float = Field(default=5.0, gt=0)
    """Longest an LDAP connection or operation may take."""
