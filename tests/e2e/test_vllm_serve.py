"""`kscope serve` on the tiny vLLM model: like `vllm serve`, a request sent
right after the start banner is answered once the model is loaded (200), not
refused with 503 while it loads. Its agent runs in serve's process (the
default) and vLLM ends with serve, whether stopped or killed with SIGKILL."""

from __future__ import annotations

import os
import re
import shlex
import signal
from pathlib import Path

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.e2e.test_vllm_path import ENGINE_ARGS, READY_TIMEOUT_S
from tests.procs import PYTHON, Proc, process_alive, wait_until
from tests.slurm_cluster import descendants

pytestmark = pytest.mark.vllm

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("end", ["stop", "kill -9"])
def test_a_request_right_after_the_banner_waits_for_the_model(
    tmp_path: Path, tiny_model: Path, vllm_python: Path, end: str
) -> None:
    serve = Proc(
        [PYTHON, "-m", "kscope_cli.main", "serve", "--engine", "vllm",
         "--model-path", str(tiny_model), "--model", "tiny", "--port", "0",
         "--controller-port", "0", "--state-dir", str(tmp_path / "s"),
         "--api-key", "serve-key", "--engine-args", shlex.join(ENGINE_ARGS)],
        tmp_path / "serve.log",
        env={"KSCOPE_VLLM_PYTHON": str(vllm_python)},
    )  # fmt: skip
    try:
        found: list[str] = []

        def announced() -> bool:
            assert serve.alive(), serve.log()[-4000:]
            match = re.search(r"KScope is up: (http://\S+)/v1", serve.log())
            found[:] = [match.group(1)] if match else []
            return bool(found)

        wait_until(announced, 60, what="serve announced itself")
        client = openai.OpenAI(
            base_url=f"{found[0]}/v1", api_key="serve-key", max_retries=0,
            timeout=READY_TIMEOUT_S,
        )  # fmt: skip
        reply = client.chat.completions.create(model="tiny", messages=HI, max_tokens=3)
        assert reply.usage is not None and reply.usage.completion_tokens == 3
        stream = client.chat.completions.create(
            model="tiny", messages=HI, max_tokens=3, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        usage = [c.usage for c in stream if c.usage is not None]
        assert len(usage) == 1 and usage[0].completion_tokens == 3
        engine = descendants(serve.pid)  # vLLM and its engine core: no agent process
        assert engine, "serve started no engine"
        if end == "kill -9":
            os.kill(serve.pid, signal.SIGKILL)
    finally:
        serve.stop()
    if end == "stop":
        assert serve.popen.returncode == 0, serve.log()[-4000:]
    wait_until(lambda: not any(process_alive(p) for p in engine), 5, 0.1,
               what=f"vLLM ended with serve ({end})")  # fmt: skip
