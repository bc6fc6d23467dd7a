"""`kscope serve` on the tiny vLLM model: like `vllm serve`, a request sent
right after the start banner is answered once the model is loaded (200), not
refused with 503 while it loads."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.e2e.test_vllm_path import ENGINE_ARGS, READY_TIMEOUT_S
from tests.procs import PYTHON, Proc, wait_until

pytestmark = pytest.mark.vllm

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


def test_a_request_right_after_the_banner_waits_for_the_model(
    tmp_path: Path, tiny_model: Path, vllm_python: Path
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
    finally:
        serve.stop()
    assert serve.popen.returncode == 0, serve.log()[-4000:]
