"""Local portal users in a small TOML file, for machines without LDAP.

Passwords are stored as salted scrypt hashes:
`scrypt$<n>$<r>$<p>$<salt, base64>$<hash, base64>`. `kscope users add` writes
the file; the portal only reads it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import tomllib
from pathlib import Path

USERNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_N, _R, _P = 2**14, 8, 1
_DUMMY = "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
"""Checked against when the user is unknown, so both cases take as long."""


class UsersFileError(Exception):
    """The users file cannot be read or a name is not acceptable."""


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${_N}${_R}${_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(expected),
            maxmem=64 * 1024 * 1024,
        )
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)


def load_users(path: Path) -> dict[str, str]:
    """Username to password hash; an absent file has no users."""
    try:
        data = tomllib.loads(path.expanduser().read_text())
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsersFileError(f"cannot read {path}: {exc}") from exc
    users = data.get("users", {})
    return {
        name: str(entry.get("password", ""))
        for name, entry in users.items()
        if isinstance(entry, dict)
    }


def check_local_user(path: Path, username: str, password: str) -> bool:
    """True when the file has this user with this password."""
    stored = load_users(path).get(username)
    if stored is None:
        verify_password(password, _DUMMY)
        return False
    return verify_password(password, stored)


def add_user(path: Path, username: str, password: str) -> None:
    """Add or replace a user (the file is written mode 600)."""
    if not USERNAME_RE.match(username):
        raise UsersFileError("a username is letters, digits, '.', '_', '@' or '-' (at most 64)")
    path = path.expanduser()
    users = load_users(path)
    users[username] = hash_password(password)
    lines = ["# KScope portal users: kscope users add NAME", ""]
    for name, stored in sorted(users.items()):
        lines += [f'[users."{name}"]', f'password = "{stored}"', ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines))
    tmp.replace(path)
