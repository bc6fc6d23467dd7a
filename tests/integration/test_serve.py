"""`kscope serve`: controller, facade and one agent from one command."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import openai
import pytest

from tests.procs import PYTHON, Proc, start_upstream, wait_until


def test_kscope_serve_openai_engine(tmp_path: Path) -> None:
    upstream = start_upstream(tmp_path)
    serve = Proc(
        [PYTHON, "-m", "kscope_cli.main", "serve", "--engine", "openai",
         "--upstream-url", upstream.url, "--model", "attached", "--port", "0",
         "--controller-port", "0", "--api-key", "serve-key", "--state-dir", str(tmp_path / "s")],
        tmp_path / "serve.log",
    )  # fmt: skip
    try:
        wait_until(lambda: "KScope is up" in serve.log(), 30, what="serve announced itself")
        match = re.search(r"KScope is up: (http://127\.0\.0\.1:\d+)/v1", serve.log())
        assert match, serve.log()
        base = match.group(1)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="serve-key", max_retries=5)
        # The SDK's own retries ride out the 503s while the agent starts.
        reply = client.chat.completions.create(
            model="attached", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert reply.usage is not None and reply.usage.completion_tokens == 3
        assert httpx.get(f"{base}/v1/models", timeout=5).status_code == 401  # key enforced
        agent_pids = [
            int(line.split(" as pid ")[1].split()[0])
            for line in serve.log().splitlines()
            if " as pid " in line
        ]
        assert len(agent_pids) == 1
    finally:
        serve.stop()
        upstream.proc.stop()
    # A clean stop stops the agent it launched, too.
    assert not Path(f"/proc/{agent_pids[0]}").exists() or _is_zombie(agent_pids[0])


def _is_zombie(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] == "Z"


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


def test_serve_requires_keys_only_off_loopback() -> None:
    from kscope_cli.main import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    assert not is_loopback("gpu-node.example.org")
