"""Checking a username and password: against LDAP (ldap3), or the local users file.

LDAP: bind as the user, either with a DN built from a template (the username
escaped as an RDN value) or with the DN a service account finds by searching
(the username escaped for the filter). An empty password is refused before
any bind: LDAP treats it as an anonymous bind, which "succeeds". Optionally the
user must be in a group. ldap3 blocks, so this runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
from dataclasses import dataclass

import ldap3
from ldap3.core.exceptions import LDAPException
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn

from facade.portal.local_users import check_local_user
from facade.portal.settings import PortalSettings

log = logging.getLogger(__name__)

BAD_CREDENTIALS = "Invalid username or password."
NOT_IN_GROUP = "Your account is not allowed to use this service. Ask an administrator for access."
UNAVAILABLE = "The login service is unavailable right now. Please try again shortly."
_MAX_USERNAME = 128


@dataclass(frozen=True)
class LoginResult:
    """A user name on success; otherwise a message safe to show."""

    user: str | None
    message: str = ""


def _ok(user: str) -> LoginResult:
    return LoginResult(user=user)


def _refused(message: str = BAD_CREDENTIALS) -> LoginResult:
    return LoginResult(user=None, message=message)


async def check_login(settings: PortalSettings, username: str, password: str) -> LoginResult:
    """Who this is, or why not; wrong passwords and unknown users read the same."""
    username = username.strip()
    if (
        not username
        or not password
        or len(username) > _MAX_USERNAME
        or any(ord(c) < 32 for c in username)
    ):
        return _refused()
    if settings.ldap_url:
        return await asyncio.to_thread(_ldap_login, settings, username, password)
    ok = await asyncio.to_thread(check_local_user, settings.users_file, username, password)
    return _ok(username) if ok else _refused()


def _server(settings: PortalSettings) -> ldap3.Server:
    tls = None
    if settings.ldap_url.startswith("ldaps://") or settings.ldap_start_tls:
        ca = str(settings.ldap_ca_file) if settings.ldap_ca_file else None
        tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=ca)
    return ldap3.Server(
        settings.ldap_url,
        use_ssl=settings.ldap_url.startswith("ldaps://"),
        tls=tls,
        get_info=ldap3.NONE,
        connect_timeout=math.ceil(settings.ldap_timeout_s),  # ldap3 packs it as an int
    )


def _connection(
    settings: PortalSettings, server: ldap3.Server, user: str | None, password: str | None
) -> ldap3.Connection:
    conn = ldap3.Connection(
        server,
        user=user,
        password=password,
        auto_bind=ldap3.AUTO_BIND_NONE,
        receive_timeout=math.ceil(settings.ldap_timeout_s),
        raise_exceptions=False,
        read_only=True,
    )
    conn.open()
    if settings.ldap_start_tls and not settings.ldap_url.startswith("ldaps://"):
        conn.start_tls()
    return conn


def _find_dn(settings: PortalSettings, server: ldap3.Server, username: str) -> str | None:
    """Search-then-bind: the one DN the filter finds for this username."""
    password = settings.ldap_bind_password.get_secret_value() if settings.ldap_bind_password else ""
    conn = _connection(settings, server, settings.ldap_bind_dn or None, password or None)
    try:
        if not conn.bind():
            raise LDAPException(f"service account bind failed: {conn.result.get('description')}")
        query = settings.ldap_user_filter.replace("{username}", escape_filter_chars(username))
        conn.search(settings.ldap_search_base, query, ldap3.SUBTREE, attributes=[], size_limit=2)
        entries = conn.entries
        # Two matches mean an ambiguous filter: refuse rather than guess.
        return str(entries[0].entry_dn) if len(entries) == 1 else None
    finally:
        conn.unbind()


def _in_group(conn: ldap3.Connection, settings: PortalSettings, dn: str, username: str) -> bool:
    member = escape_filter_chars(dn)
    uid = escape_filter_chars(username)
    query = f"(|(member={member})(uniqueMember={member})(memberUid={uid}))"
    conn.search(settings.ldap_required_group, query, ldap3.BASE, attributes=[])
    return len(conn.entries) == 1


def _ldap_login(settings: PortalSettings, username: str, password: str) -> LoginResult:
    try:
        server = _server(settings)
        if settings.ldap_user_dn_template:
            dn: str | None = settings.ldap_user_dn_template.replace(
                "{username}", escape_rdn(username)
            )
        else:
            dn = _find_dn(settings, server, username)
        if dn is None:
            return _refused()
        conn = _connection(settings, server, dn, password)
        try:
            if not conn.bind():
                return _refused()
            if settings.ldap_required_group and not _in_group(conn, settings, dn, username):
                log.info("portal login refused: not in the required group")
                return _refused(NOT_IN_GROUP)
        finally:
            conn.unbind()
    except LDAPException as exc:
        log.warning("LDAP login failed: %s", type(exc).__name__)
        return _refused(UNAVAILABLE)
    return _ok(username.lower())
