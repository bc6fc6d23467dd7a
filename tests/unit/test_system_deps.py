"""scripts/system-deps.sh is the one list of Debian packages the tests need:
every tool the tests and scripts look for must be in it, with its package."""

from __future__ import annotations

import re
import subprocess

from tests.e2e.test_portal_browser import CHROMIUM
from tests.ldap_server import SLAPD
from tests.procs import ROOT


def _listed() -> dict[str, str]:
    done = subprocess.run(
        [str(ROOT / "scripts" / "system-deps.sh"), "--list"],
        capture_output=True, text=True, check=True, timeout=10,
    )  # fmt: skip
    pairs = [line.split() for line in done.stdout.splitlines() if line.strip()]
    assert all(len(p) == 2 for p in pairs), pairs
    return {tool: package for tool, package in pairs}


def test_every_tool_the_tests_look_for_is_installed_by_it() -> None:
    listed = _listed()
    slurm_up = (ROOT / "scripts" / "slurm-up.sh").read_text()
    loop = re.search(r"for bin in ([^;]+); do", slurm_up)
    assert loop is not None
    wanted = set(loop.group(1).split())
    wanted |= {SLAPD.rsplit("/", 1)[-1], "ldapadd", CHROMIUM.rsplit("/", 1)[-1], "setpriv"}
    assert wanted <= set(listed), sorted(wanted - set(listed))


def test_ci_and_make_test_use_it() -> None:
    assert "scripts/system-deps.sh" in (ROOT / ".ci" / "run").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test: system-deps ", makefile, re.MULTILINE)
    assert "apt-get install" not in (ROOT / ".ci" / "run").read_text()
