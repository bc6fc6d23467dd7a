"""Portal login against a real OpenLDAP (slapd): the right password logs in; a
wrong password and an unknown user read the same; a user outside the required
group is refused; LDAP injection in the username fails safely. Both ways of
finding the user: a DN template, and search-then-bind."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest

from tests import ldap_server
from tests.conftest import SLAPD_HOW, require
from tests.ldap_server import ALLOWED_GROUP, PEOPLE, ROOT_DN, ROOT_PW, USERS, start_ldap
from tests.procs import Facade, start_controller, start_facade

pytestmark = pytest.mark.ldap


@pytest.fixture(scope="module", autouse=True)
def _slapd() -> None:
    require("OpenLDAP (slapd, ldap-utils)", ldap_server.available(), SLAPD_HOW)


BAD = "Invalid username or password."


@pytest.fixture(scope="module", params=["dn-template", "search-then-bind"])
def portal(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Facade]:
    tmp = tmp_path_factory.mktemp("ldap")
    ldap = start_ldap(tmp)
    controller = start_controller(tmp, "")
    env = {
        "KSCOPE_PORTAL_LDAP_URL": ldap.url,
        "KSCOPE_PORTAL_LDAP_REQUIRED_GROUP": ALLOWED_GROUP,
        "KSCOPE_PORTAL_SERVICE_KEY": (controller.state_dir / "admin-key").read_text().strip(),
    }
    if request.param == "dn-template":
        env["KSCOPE_PORTAL_LDAP_USER_DN_TEMPLATE"] = f"uid={{username}},{PEOPLE}"
    else:
        env |= {
            "KSCOPE_PORTAL_LDAP_BIND_DN": ROOT_DN,
            "KSCOPE_PORTAL_LDAP_BIND_PASSWORD": ROOT_PW,
            "KSCOPE_PORTAL_LDAP_SEARCH_BASE": PEOPLE,
        }
    facade = start_facade(tmp, controller, env=env)
    try:
        yield facade
    finally:
        facade.proc.stop()
        controller.proc.stop()
        ldap.proc.stop()


def _login(facade: Facade, username: str, password: str) -> httpx.Response:
    with httpx.Client(base_url=f"{facade.base_url}/portal", timeout=10) as http:
        page = http.get("/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert token is not None
        reply = http.post(
            "/login",
            data={"username": username, "password": password, "csrf_token": token.group(1)},
        )
        if reply.status_code == 303:
            # Logged in: the keys page names the user.
            keys = http.get("/keys")
            assert keys.status_code == 200 and f"<strong>{username.lower()}</strong>" in keys.text
        return reply


def _error(reply: httpx.Response) -> str:
    match = re.search(r'id="login-error">([^<]*)<', reply.text)
    assert match is not None, reply.text
    return match.group(1)


def test_right_password_logs_in(portal: Facade) -> None:
    for user in ("alice", "bob"):
        reply = _login(portal, user, USERS[user])
        assert reply.status_code == 303 and reply.headers["location"] == "/portal/keys"


def test_wrong_password_and_unknown_user_read_the_same(portal: Facade) -> None:
    wrong = _login(portal, "alice", "not-her-password")
    unknown = _login(portal, "mallory", "whatever-1")
    empty = _login(portal, "alice", "")  # an unauthenticated bind must not count
    assert wrong.status_code == unknown.status_code == 401
    assert _error(wrong) == _error(unknown) == BAD
    assert empty.status_code in (401, 422) and "/portal/keys" not in empty.headers.get(
        "location", ""
    )


def test_user_outside_the_required_group_is_refused(portal: Facade) -> None:
    reply = _login(portal, "carol", USERS["carol"])
    assert reply.status_code == 401
    assert "not allowed" in _error(reply)


@pytest.mark.parametrize(
    "username",
    [
        "*",
        "alice*",
        "a*",
        "alice)(uid=*",
        "*)(|(uid=*",
        "alice)(|(objectClass=*))",
        "alice,ou=people,dc=example,dc=org",
        "uid=alice,ou=people,dc=example,dc=org",
        "alice\\",
        "alice\x00",
        "carol)(memberOf=*",
    ],
)
def test_ldap_injection_in_the_username_fails_safely(portal: Facade, username: str) -> None:
    for password in (USERS["alice"], "*"):
        reply = _login(portal, username, password)
        assert reply.status_code == 401, username
        assert _error(reply) == BAD
    assert portal.proc.alive()
