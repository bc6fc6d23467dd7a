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
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import aiohttp

from node_agent.engines.base import EngineOutput, EngineRequest, EngineUnavailable
from node_agent.engines.openai_upstream import OpenAIUpstream

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


KEPT_FOR_OPERATORS = "KSCOPE_INSTANCE_ID"
"""Not a secret: it lets operators (and `ps e`) tell which instance a process serves."""


def engine_environment(environ: Mapping[str, str], instance_id: str = "") -> dict[str, str]:
    """The agent's environment less every KScope setting and secret, plus the
    instance it serves (KSCOPE_INSTANCE_ID, when known: given by the agent, as
    one that shares its process has no such variable of its own)."""
    env = {
        name: value
        for name, value in environ.items()
        if not name.upper().startswith(("KSCOPE_", "PROXY_")) and name != "VLLM_API_KEY"
    }
    if instance_id:
        env[KEPT_FOR_OPERATORS] = instance_id
    return env


LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM 0.32 takes for --max-lora-rank (its default is 16)."""


def _lora_rank(path: str) -> int:
    """An adapter's rank (`r` in its adapter_config.json); 0 when unreadable
    (vLLM then says what is wrong with it)."""
    try:
        config = json.loads((Path(path) / "adapter_config.json").read_text())
        return int(config.get("r", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def lora_flags(modules: Sequence[str], engine_args: Sequence[str]) -> list[str]:
    """vLLM's flags for serving the LoRA adapters `modules` (NAME=PATH each):
    --enable-lora, the adapters, and limits that fit all of them at once
    (--max-loras, --max-lora-rank), unless `engine_args` set those already."""
    if not modules:
        return []
    given = {arg.split("=", 1)[0] for arg in engine_args if arg.startswith("--")}
    flags = [] if "--enable-lora" in given else ["--enable-lora"]
    flags += ["--lora-modules", *modules]
    if "--max-loras" not in given:
        flags += ["--max-loras", str(len(modules))]
    rank = max(_lora_rank(m.partition("=")[2]) for m in modules)
    if "--max-lora-rank" not in given and rank > 16:
        flags += ["--max-lora-rank", str(next((r for r in LORA_RANKS if r >= rank), rank))]
    return flags


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
        aliases: Sequence[str] = (),
        lora_modules: Sequence[str] = (),
        instance_id: str = "",
    ):
        """`instance_id`: shown in vLLM's environment (KSCOPE_INSTANCE_ID) for
        operators; given, not inherited, since an agent may share its process."""
        self._instance_id = instance_id
        self._python = python
        self._model_path = model_path
        self._served_model = served_model
        self._engine_args = list(engine_args)
        self._aliases = [a for a in aliases if a != served_model]
        self._lora_modules = list(lora_modules)
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

    @property
    def root(self) -> str:
        """vLLM's own URL, without /v1 (/version, /openapi.json live there)."""
        return self._root

    @property
    def api_key(self) -> str:
        """The key vLLM wants (for the agent's own questions to it)."""
        return self._api_key

    @property
    def engine_args(self) -> list[str]:
        """The flags vLLM runs with beyond the model, names and address."""
        return [*lora_flags(self._lora_modules, self._engine_args), *self._engine_args]

    def command(self) -> list[str]:
        # vLLM answers to every served name (the first is the one it answers
        # with) and serves each LoRA adapter under its own name.
        argv = [
            self._python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self._model_path,
            "--served-model-name", self._served_model, *self._aliases,
            "--host", "127.0.0.1",
            "--port", str(self._port),
            *self.engine_args,
        ]  # fmt: skip
        setpriv = shutil.which("setpriv")
        if setpriv:  # util-linux; absent on macOS, where vLLM is not the engine anyway
            argv = [setpriv, "--pdeathsig", "TERM", "--", *argv]
        return argv

    async def start(self) -> None:
        self._cache_dir = tempfile.mkdtemp(prefix="kscope-vllm-")
        env = engine_environment(os.environ, self._instance_id)
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

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        return self._forward.generate(request)

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
