"""The `vllm` engine: vLLM's OpenAI server as a supervised subprocess.

The agent starts vLLM in its own session and process group, so stopping it
reaches its engine-core children too; with `setpriv --pdeathsig` vLLM is also told to stop
when the agent dies without cleaning up (SIGKILL). Requests go to it over
keep-alive HTTP on loopback, through the `openai` engine's forwarding code.

vLLM listens on loopback, where any other job on the node can reach it: it
gets a random API key (VLLM_API_KEY, in its environment, never its command
line) that only this agent knows. Its environment carries no KScope setting
or secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence

import aiohttp

from node_agent.engines.base import Endpoint, EngineOutput, EngineUnavailable
from node_agent.engines.openai_upstream import OpenAIUpstream

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


KEPT_FOR_OPERATORS = "KSCOPE_INSTANCE_ID"
"""Not a secret: it lets operators (and `ps e`) tell which instance a process serves."""


def engine_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The agent's environment less every KScope setting and secret."""
    return {
        name: value
        for name, value in environ.items()
        if name == KEPT_FOR_OPERATORS
        or (not name.upper().startswith(("KSCOPE_", "PROXY_")) and name != "VLLM_API_KEY")
    }


class VllmEngine:
    """Starts, health-checks and stops one vLLM OpenAI server."""

    kind = "vllm"

    def __init__(
        self,
        python: str,
        model_path: str,
        served_model: str,
        engine_args: Sequence[str] = (),
        timeout_s: float = 600.0,
        stop_grace_s: float = 15.0,
    ):
        self._python = python
        self._model_path = model_path
        self._served_model = served_model
        self._engine_args = list(engine_args)
        self._stop_grace_s = stop_grace_s
        self._port = free_port()
        self._root = f"http://127.0.0.1:{self._port}"
        self.url = self._root + "/v1"
        self._api_key = secrets.token_urlsafe(32)
        self._forward = OpenAIUpstream(
            self.url, served_model, api_key=self._api_key, timeout_s=timeout_s
        )
        self._proc: asyncio.subprocess.Process | None = None
        self._health: aiohttp.ClientSession | None = None
        self._cache_dir = ""

    def command(self) -> list[str]:
        argv = [
            self._python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self._model_path,
            "--served-model-name", self._served_model,
            "--host", "127.0.0.1",
            "--port", str(self._port),
            *self._engine_args,
        ]  # fmt: skip
        setpriv = shutil.which("setpriv")
        if setpriv:  # util-linux; absent on macOS, where vLLM is not the engine anyway
            argv = [setpriv, "--pdeathsig", "TERM", "--", *argv]
        return argv

    async def start(self) -> None:
        self._cache_dir = tempfile.mkdtemp(prefix="kscope-vllm-")
        env = engine_environment(os.environ)
        env["VLLM_API_KEY"] = self._api_key
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env.setdefault("VLLM_CACHE_ROOT", self._cache_dir)
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        argv = self.command()
        log.info("starting vLLM: %s", " ".join(argv))
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *argv, env=env, stdin=asyncio.subprocess.DEVNULL, start_new_session=True
            )
        except (OSError, ValueError) as exc:
            raise EngineUnavailable(f"cannot start vLLM with {self._python}: {exc}") from exc
        await self._forward.start()

    def failure(self) -> str:
        if self._proc is not None and self._proc.returncode is not None:
            return f"vLLM exited with code {self._proc.returncode}"
        return ""

    async def healthy(self) -> bool:
        if self._proc is None or self._proc.returncode is not None:
            return False
        if self._health is None:
            self._health = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3))
        try:
            async with self._health.get(self._root + "/health") as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    def generate(
        self, endpoint: Endpoint, body: bytes, stream: bool
    ) -> AsyncIterator[EngineOutput]:
        return self._forward.generate(endpoint, body, stream)

    async def stop(self) -> None:
        await self._forward.stop()
        if self._health is not None:
            await self._health.close()
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self._stop_grace_s)
            except TimeoutError:
                log.warning("vLLM ignored SIGTERM for %.0fs; killing", self._stop_grace_s)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        # The group leader is gone; make sure no engine-core child lingers.
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        if self._cache_dir:
            shutil.rmtree(self._cache_dir, ignore_errors=True)
