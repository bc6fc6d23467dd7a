"""`kscope serve`: controller, facade and one agent from one command."""

from __future__ import annotations

import ipaddress
import re
import socket
import subprocess
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.procs import PYTHON, Controller, Proc, Upstream, start_upstream, wait_until
from tests.slurm_cluster import descendants

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


def _serve(tmp: Path, upstream: Upstream, *extra: str) -> Proc:
    return Proc(
        [PYTHON, "-m", "kscope_cli.main", "serve", "--engine", "openai",
         "--upstream-url", upstream.url, "--model", "attached", "--port", "0",
         "--controller-port", "0", "--state-dir", str(tmp / "s"), *extra],
        tmp / "serve.log",
    )  # fmt: skip


def _announced(serve: Proc) -> tuple[str, int]:
    """The base URL and the controller port `kscope serve` prints for its user."""
    found: list[re.Match[str]] = []

    def announced() -> bool:
        assert serve.alive(), serve.log()[-4000:]
        text = serve.log()
        base = re.search(r"KScope is up: (http://\S+)/v1", text)
        controller = re.search(r"--controller 127\.0\.0\.1:(\d+)", text)
        found[:] = [m for m in (base, controller) if m]
        return len(found) == 2

    wait_until(announced, 30, what="serve announced itself")
    return found[0].group(1), int(found[1].group(1))


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@pytest.mark.parametrize("agents", ["in-process", "processes"])
def test_kscope_serve_openai_engine(tmp_path: Path, agents: str) -> None:
    upstream = start_upstream(tmp_path)
    mode = ["--agent-processes"] if agents == "processes" else []
    serve = _serve(tmp_path, upstream, "--api-key", "serve-key", *mode)
    started: list[int] = []
    try:
        base, controller_port = _announced(serve)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="serve-key", max_retries=0)
        # Sent right after the banner, while the agent starts: it waits for the
        # model (as `vllm serve` clients do), no 503 to retry.
        reply = client.chat.completions.create(model="attached", messages=HI, max_tokens=3)
        assert reply.usage is not None and reply.usage.completion_tokens == 3
        stream = client.chat.completions.create(
            model="attached", messages=HI, max_tokens=4, stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == " tok" * 4
        assert httpx.get(f"{base}/v1/models", timeout=5).status_code == 401  # key enforced
        controller = Controller(serve, controller_port, tmp_path / "s", tmp_path, tmp_path)
        (agent,) = controller.list_agents()
        started = descendants(serve.pid)
        if agents == "processes":  # the agent the controller knows is a process serve started
            assert agent.pid in started
        else:  # the agent runs in serve's own process, and serve started no other
            assert agent.pid == serve.pid
            assert started == []
    finally:
        serve.stop()
        upstream.proc.stop()
    # A clean stop (SIGTERM) exits 0 and stops every process serve started.
    assert serve.popen.returncode == 0, serve.log()[-4000:]
    assert [pid for pid in started if _alive(pid)] == []


def _non_loopback_address() -> tuple[str, str]:
    """(where to bind, where to connect): an IPv4 address of this machine that
    is not loopback, or 0.0.0.0 (not loopback either) reached through 127.0.0.1."""
    try:
        listed = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5)
        candidates = listed.stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        candidates = []
    for address in candidates:
        ip = ipaddress.ip_address(address)
        if ip.version != 4 or ip.is_loopback:
            continue
        with socket.socket() as probe:
            try:
                probe.bind((address, 0))
            except OSError:
                continue
        return address, address
    return "0.0.0.0", "127.0.0.1"


@pytest.mark.parametrize("where", ["loopback", "network"])
def test_serve_requires_keys_only_off_loopback(tmp_path: Path, where: str) -> None:
    """Bound to loopback, `kscope serve` (like `vllm serve`) needs no key; bound
    where the network reaches it, a request without a key is refused and the
    printed admin key is let in."""
    bind, connect = ("127.0.0.1", "127.0.0.1") if where == "loopback" else _non_loopback_address()
    upstream = start_upstream(tmp_path)
    serve = _serve(tmp_path, upstream, "--host", bind)
    try:
        base, _ = _announced(serve)
        port = int(base.rsplit(":", 1)[1])
        url = f"http://{connect}:{port}/v1/chat/completions"
        body = {"model": "attached", "messages": HI, "max_tokens": 2}
        admin = {"Authorization": f"Bearer {(tmp_path / 's' / 'admin-key').read_text().strip()}"}
        keyed: list[int] = []

        def served(headers: dict[str, str]) -> bool:
            keyed[:] = [httpx.post(url, json=body, headers=headers, timeout=5).status_code]
            return keyed[0] != 503  # 503 while the agent starts

        if where == "loopback":
            wait_until(lambda: served({}), 30, 0.2, what="a keyless request answered")
            assert keyed == [200]
        else:
            wait_until(lambda: served(admin), 30, 0.2, what="the admin key's request answered")
            assert keyed == [200]
            keyless = httpx.post(url, json=body, timeout=5)
            assert keyless.status_code == 401, keyless.text
            assert keyless.json()["error"]["code"] == "missing_api_key"
    finally:
        serve.stop()
        upstream.proc.stop()


def test_kscope_serve_rejects_bad_flags(tmp_path: Path) -> None:
    for argv, complaint in [
        (["--engine", "openai"], "needs --upstream-url"),
        (["--engine", "vllm"], "needs --model-path"),
        (["--engine", "tpu"], "tpu"),
    ]:
        proc = Proc([PYTHON, "-m", "kscope_cli.main", "serve", *argv], tmp_path / "bad.log")
        assert proc.popen.wait(30) != 0
        assert complaint in proc.log()


@pytest.mark.parametrize("flag", ["--engine", "--model-type"])
def test_model_type_is_a_synonym_of_engine(tmp_path: Path, flag: str) -> None:
    proc = Proc([PYTHON, "-m", "kscope_cli.main", "serve", flag, "openai"], tmp_path / "x.log")
    assert proc.popen.wait(30) != 0
    assert "needs --upstream-url" in proc.log()
