"""A real OpenLDAP server (Debian's slapd) for tests: its own slapd.conf and data
directory under a temp dir, on a free loopback port, in the foreground in its own
process group; a few users and groups loaded with ldapadd."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.procs import Proc

SLAPD = "/usr/sbin/slapd"
SUFFIX = "dc=example,dc=org"
ROOT_DN = f"cn=admin,{SUFFIX}"
ROOT_PW = "root-secret"
PEOPLE = f"ou=people,{SUFFIX}"
ALLOWED_GROUP = f"cn=kscope-users,ou=groups,{SUFFIX}"
USERS = {"alice": "alice-pw-1", "bob": "bob-pw-2", "carol": "carol-pw-3"}
"""alice and bob are in kscope-users; carol is not."""

_CONF = """\
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
include /etc/ldap/schema/nis.schema
pidfile {dir}/slapd.pid
argsfile {dir}/slapd.args
modulepath /usr/lib/ldap
moduleload back_mdb
database mdb
maxsize 16777216
suffix "{suffix}"
rootdn "{root_dn}"
rootpw {root_pw}
directory {dir}/data
access to attrs=userPassword by anonymous auth by self read by * none
access to * by * read
"""


def available() -> bool:
    return Path(SLAPD).exists() and shutil.which("ldapadd") is not None


def _ldif() -> str:
    parts = [
        f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\n"
        "o: Example\ndc: example\n",
        f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n",
        f"dn: ou=groups,{SUFFIX}\nobjectClass: organizationalUnit\nou: groups\n",
    ]
    for uid, password in USERS.items():
        parts.append(
            f"dn: uid={uid},{PEOPLE}\nobjectClass: inetOrgPerson\nuid: {uid}\n"
            f"cn: {uid.title()}\nsn: {uid.title()}\nuserPassword: {password}\n"
        )
    parts.append(
        f"dn: {ALLOWED_GROUP}\nobjectClass: groupOfNames\ncn: kscope-users\n"
        f"member: uid=alice,{PEOPLE}\nmember: uid=bob,{PEOPLE}\n"
    )
    parts.append(
        f"dn: cn=others,ou=groups,{SUFFIX}\nobjectClass: groupOfNames\ncn: others\n"
        f"member: uid=carol,{PEOPLE}\n"
    )
    return "\n".join(parts)


@dataclass
class LdapServer:
    proc: Proc
    port: int

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_ready(proc: Proc, port: int, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"slapd exited:\n{proc.log()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"slapd not listening on {port}:\n{proc.log()[-3000:]}")


def start_ldap(tmp: Path) -> LdapServer:
    """slapd with the test directory loaded; stop it with .proc.stop()."""
    root = tmp / "slapd"
    (root / "data").mkdir(parents=True, exist_ok=True)
    conf = root / "slapd.conf"
    conf.write_text(_CONF.format(dir=root, suffix=SUFFIX, root_dn=ROOT_DN, root_pw=ROOT_PW))
    for _attempt in range(3):
        port = _free_port()
        # -d keeps slapd in the foreground (no fork), so its process group is ours.
        proc = Proc(
            [SLAPD, "-d", "0", "-f", str(conf), "-h", f"ldap://127.0.0.1:{port}/"],
            tmp / "logs" / "slapd.log",
        )
        try:
            _wait_ready(proc, port)
            break
        except RuntimeError:
            proc.stop()  # another process took the port meanwhile: try again
    else:
        raise RuntimeError("slapd did not start")
    ldif = root / "data.ldif"
    ldif.write_text(_ldif())
    subprocess.run(
        ["ldapadd", "-x", "-H", f"ldap://127.0.0.1:{port}", "-D", ROOT_DN, "-w", ROOT_PW,
         "-f", str(ldif)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return LdapServer(proc, port)
