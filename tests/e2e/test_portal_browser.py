"""The portal in headless Chromium (Debian's, driven by Playwright): log in against
a real OpenLDAP, create a key, read it from the page, chat with it through the
`openai` SDK, revoke it in the page and see the SDK refused within a second.
Screenshots of the keys and models pages go to test-artifacts/."""

from __future__ import annotations

import importlib.util
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests import ldap_server
from tests.conftest import CHROMIUM_HOW, SLAPD_HOW, require
from tests.ldap_server import ALLOWED_GROUP, PEOPLE, USERS, start_ldap
from tests.procs import (
    ROOT,
    Facade,
    start_controller,
    start_facade,
    start_upstream,
    stop_instances_left_behind,
    wait_until,
)

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]

pytestmark = [pytest.mark.browser, pytest.mark.ldap]


@pytest.fixture(scope="module", autouse=True)
def _chromium_and_slapd() -> None:
    playwright = importlib.util.find_spec("playwright") is not None
    require("Chromium and Playwright", Path(CHROMIUM).exists() and playwright, CHROMIUM_HOW)
    require("OpenLDAP (slapd, ldap-utils)", ldap_server.available(), SLAPD_HOW)


@dataclass
class Site:
    facade: Facade


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
        },
    )
    try:
        wait_until(
            lambda: any(i.state == 5 for i in controller.list_instances("alpha")),
            30, what="alpha ready",
        )  # fmt: skip
        yield Site(facade)
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
