"""The portal in headless Chromium (Debian's, driven by Playwright): log in against
a real OpenLDAP, create a key, read it from the page, chat with it through the
`openai` SDK, revoke it in the page and see the SDK refused within a second;
then the usage page: the user's own tokens per model and day, nobody else's,
and everyone's for an admin user. Screenshots of the pages go to test-artifacts/."""

from __future__ import annotations

import importlib.util
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from kscope.v1 import keys_pb2, keys_pb2_grpc, usage_pb2, usage_pb2_grpc
from tests import ldap_server
from tests.conftest import CHROMIUM_HOW, SLAPD_HOW, require
from tests.ldap_server import ALLOWED_GROUP, PEOPLE, USERS, start_ldap
from tests.procs import (
    ROOT,
    Controller,
    Facade,
    start_controller,
    start_facade,
    start_upstream,
    stop_instances_left_behind,
    wait_until,
)

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, Playwright

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
LONG: list[ChatCompletionMessageParam] = [{"role": "user", "content": "tell me " * 400}]
"""Another owner's request: far more tokens than any of alice's."""
ADMIN = "bob"
"""The portal's admin user (KSCOPE_PORTAL_ADMIN_USERS)."""
OTHER_OWNER = "mallory-usage"
"""An owner with a key and usage but no portal login."""

pytestmark = [pytest.mark.browser, pytest.mark.ldap]


@pytest.fixture(scope="module", autouse=True)
def _chromium_and_slapd() -> None:
    playwright = importlib.util.find_spec("playwright") is not None
    require("Chromium and Playwright", Path(CHROMIUM).exists() and playwright, CHROMIUM_HOW)
    require("OpenLDAP (slapd, ldap-utils)", ldap_server.available(), SLAPD_HOW)


@dataclass
class Site:
    facade: Facade
    controller: Controller


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("browser")
    ldap = start_ldap(tmp)
    upstream = start_upstream(tmp)
    controller = start_controller(
        tmp,
        f"""
[[models]]
name = "alpha"
engine = "openai"
upstream_url = "{upstream.url}"
min_replicas = 1
expected_startup_s = 3

[[models]]
name = "gamma-cold"
engine = "openai"
upstream_url = "{upstream.url}"
min_replicas = 0
expected_startup_s = 3
""",
        env={"MIN_UPDATE_INTERVAL_SECONDS": "0.5"},
    )
    facade = start_facade(
        tmp,
        controller,
        env={
            "KSCOPE_REQUIRE_KEY": "1",
            "KSCOPE_PORTAL_SERVICE_KEY": (controller.state_dir / "admin-key").read_text().strip(),
            "KSCOPE_PORTAL_LDAP_URL": ldap.url,
            "KSCOPE_PORTAL_LDAP_USER_DN_TEMPLATE": f"uid={{username}},{PEOPLE}",
            "KSCOPE_PORTAL_LDAP_REQUIRED_GROUP": ALLOWED_GROUP,
            "KSCOPE_PORTAL_ADMIN_USERS": f'["{ADMIN}"]',
        },
    )
    try:
        wait_until(
            lambda: any(i.state == 5 for i in controller.list_instances("alpha")),
            30, what="alpha ready",
        )  # fmt: skip
        yield Site(facade, controller)
    finally:
        facade.proc.stop()
        controller.proc.stop()
        stop_instances_left_behind(controller.state_dir)
        upstream.proc.stop()
        ldap.proc.stop()


def test_log_in_create_key_chat_revoke(site: Site) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    base = site.facade.base_url
    from playwright.sync_api import sync_playwright  # present: the module fixture checked

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=shutil.which(CHROMIUM) or CHROMIUM,
            headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.goto(f"{base}/portal/")
            page.get_by_label("Username").fill("alice")
            page.get_by_label("Password").fill(USERS["alice"])
            page.get_by_role("button", name="Log in").click()
            page.wait_for_url(f"{base}/portal/keys")

            page.get_by_label("Name").fill("notebook")
            page.get_by_label("Expires in (days)").fill("30")
            page.get_by_role("button", name="Create key").click()
            page.wait_for_selector("#new-key")
            secret = page.input_value("#new-key")
            assert secret.startswith("ks-")
            page.screenshot(path=str(ARTIFACTS / "portal-keys.png"), full_page=True)

            client = openai.OpenAI(base_url=f"{base}/v1", api_key=secret, max_retries=0, timeout=10)
            reply = client.chat.completions.create(model="alpha", messages=HI)
            assert reply.choices[0].message.content

            page.get_by_role("navigation").get_by_role("link", name="Models").click()
            page.wait_for_url(f"{base}/portal/models")
            row = page.locator("tr", has_text="alpha")
            assert "READY" in row.inner_text()
            assert "COLD" in page.locator("tr", has_text="gamma-cold").inner_text()
            page.screenshot(path=str(ARTIFACTS / "portal-models.png"), full_page=True)

            # The model page: three charts of the telemetry, drawn as inline SVG.
            page.get_by_role("link", name="alpha").click()
            page.wait_for_url(f"{base}/portal/models/alpha")
            for title in ("Requests per second", "Latency", "Instances"):
                chart = page.get_by_role("img", name=re.compile(f"^{title}, "))
                assert chart.is_visible() and chart.bounding_box()["width"] > 200  # type: ignore[index]
            ready = page.locator("#chart-instances polyline[data-series=ready]")
            assert ready.count() == 1 and len(ready.get_attribute("points").split()) >= 2  # type: ignore[union-attr]
            page.screenshot(path=str(ARTIFACTS / "portal-model.png"), full_page=True)

            page.get_by_role("navigation").get_by_role("link", name="Connect").click()
            snippet = page.locator("#python").inner_text()
            assert f'base_url="{base}/v1"' in snippet and 'model="alpha"' in snippet
            assert "503" in page.content()

            page.get_by_role("navigation").get_by_role("link", name="API keys").click()
            page.get_by_role("button", name="Revoke key notebook").click()
            page.wait_for_url(f"{base}/portal/keys")
            revoked_at = time.monotonic()
            assert "revoked" in page.locator("tr", has_text="notebook").inner_text()
        finally:
            browser.close()
    while True:
        try:
            client.chat.completions.create(model="alpha", messages=HI)
        except openai.AuthenticationError:
            break
        assert time.monotonic() - revoked_at < 1.0, "the revoked key still works after 1 s"
        time.sleep(0.02)
    assert time.monotonic() - revoked_at < 1.0


def _launch(pw: Playwright) -> Browser:
    return pw.chromium.launch(
        executable_path=shutil.which(CHROMIUM) or CHROMIUM,
        headless=True,
        args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
    )


def _create_key(controller: Controller, owner: str) -> str:
    with controller.channel() as channel:
        reply = keys_pb2_grpc.KeyServiceStub(channel).CreateKey(
            keys_pb2.CreateKeyRequest(owner=owner, name="usage"), timeout=10
        )
    return reply.secret


def _tokens_by_owner(controller: Controller) -> dict[str, tuple[int, int]]:
    """Everyone's (requests, tokens) as the controller has them, asked with its admin key."""
    with controller.channel() as channel:
        reply = usage_pb2_grpc.UsageServiceStub(channel).QueryUsage(
            usage_pb2.QueryUsageRequest(by=usage_pb2.USAGE_GROUPING_OWNER), timeout=10
        )
    return {r.group: (r.requests, r.prompt_tokens + r.completion_tokens) for r in reply.rows}


def _log_in(page: Page, base: str, user: str) -> None:
    page.goto(f"{base}/portal/login")
    page.get_by_label("Username").fill(user)
    page.get_by_label("Password").fill(USERS[user])
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(f"{base}/portal/keys")


def test_usage_page_shows_own_usage_and_admins_everyones(site: Site) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    base = site.facade.base_url
    from playwright.sync_api import sync_playwright

    # alice's requests, then another owner's (bigger): once the other's are
    # reported, alice's (reported in the same or an earlier batch) are too.
    for owner, messages, count in (("alice", HI, 2), (OTHER_OWNER, LONG, 1)):
        client = openai.OpenAI(
            base_url=f"{base}/v1", api_key=_create_key(site.controller, owner),
            max_retries=0, timeout=10,
        )  # fmt: skip
        for _ in range(count):
            assert client.chat.completions.create(model="alpha", messages=messages).usage
    wait_until(lambda: OTHER_OWNER in _tokens_by_owner(site.controller), 10, what="usage reported")
    everyone = _tokens_by_owner(site.controller)
    alice_requests, alice_tokens = everyone["alice"]
    other_tokens = everyone[OTHER_OWNER][1]
    assert alice_requests >= 2 and 0 < alice_tokens < other_tokens

    with sync_playwright() as pw:
        browser = _launch(pw)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            _log_in(page, base, "alice")
            page.get_by_role("navigation").get_by_role("link", name="Usage").click()
            page.wait_for_url(f"{base}/portal/usage")
            total = page.locator("#usage-days tfoot tr")
            deadline = time.monotonic() + 10
            while total.get_attribute("data-tokens") != str(alice_tokens):
                assert time.monotonic() < deadline, "the page never showed alice's usage"
                time.sleep(0.5)
                page.reload()
            row = page.locator("#usage-days tbody tr[data-model=alpha]")
            assert row.count() == 1 and int(row.get_attribute("data-tokens") or 0) > 0
            assert "alpha" in row.inner_text()
            assert total.get_attribute("data-requests") == str(alice_requests)
            chart = page.get_by_role("img", name=re.compile("^Tokens per day, "))
            assert chart.is_visible() and chart.bounding_box()["width"] > 400  # type: ignore[index]
            assert page.locator("#chart-tokens rect.bar").count() >= 1
            # Nobody else's figures: not the other owner, nor anyone's total.
            html = page.content()
            assert OTHER_OWNER not in html and ADMIN not in html
            cells = page.locator("#usage-days td").all_inner_texts()
            assert f"{other_tokens:,}" not in cells
            assert f"{alice_tokens + other_tokens:,}" not in cells
            assert page.locator("#usage-owners").count() == 0
            assert "Everyone" not in page.inner_text("main")
            page.screenshot(path=str(ARTIFACTS / "portal-usage.png"), full_page=True)

            # An admin user: their own figures (none) and everyone's per owner.
            admin = browser.new_context().new_page()
            _log_in(admin, base, ADMIN)
            admin.goto(f"{base}/portal/usage")
            assert admin.locator("#usage-days tbody tr[data-model]").count() == 0
            owners = admin.locator("#usage-owners tbody tr[data-owner]")
            shown = {
                owners.nth(i).get_attribute("data-owner"): owners.nth(i).get_attribute(
                    "data-tokens"
                )
                for i in range(owners.count())
            }
            assert shown["alice"] == str(alice_tokens)
            assert shown[OTHER_OWNER] == str(other_tokens)
            admin.screenshot(path=str(ARTIFACTS / "portal-usage-admin.png"), full_page=True)
        finally:
            browser.close()
