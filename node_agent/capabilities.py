"""What an instance can do, learned from its engine, off the token path.

The agent asks once its engine first answers health (before it says READY)
and again every `capabilities_refresh_s` (an upstream's models, vLLM's LoRA
adapters), and tells the controller when the answer changed
(controller_link.py). What cannot change while an engine runs is learned
once: vLLM's version and paths, the model directory, all of an MLX model.

- vllm: `/v1/models` (max_model_len; the LoRA adapters are the entries with a
  `parent`), `/version`, `/openapi.json` (the paths it registered, which
  follow its runner's tasks: generate → chat, completions, responses …;
  pooling → embeddings, pooling, classify, score …), its flags (`--runner`,
  `--tool-call-parser`, `--limit-mm-per-prompt`) and the model directory
  (a vision or audio tower in config.json; the tokenizer's longest token).
- mlx_vlm: the model directory: chat only, text and image (when the model
  has a vision tower), no tools, no structured output.
- openai: the upstream's `/v1/models` (max_model_len when it gives one, as
  vLLM does); the catalog declares the rest (`[models.capabilities]`,
  applied by the controller).

A field the engine does not tell stays empty ("not known"): the facade
refuses nothing on its account and the engine judges.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from kscope_common.capabilities import ENDPOINT_OF_PATH, Capabilities, LoraAdapter

log = logging.getLogger(__name__)

HTTP_TIMEOUT_S = 5.0
"""Each question to the engine must be answered within this."""


_GENERATE_ENDPOINTS = frozenset({"chat_completions", "completions", "responses"})


class DiscoveryError(Exception):
    """The engine did not say what it can do (unreachable, or a bad answer)."""


# --- the model directory -----------------------------------------------------------------


@dataclass(frozen=True)
class ModelDirectory:
    """What a model's files say (config.json, tokenizer.json)."""

    input_modalities: frozenset[str] = frozenset({"text"})
    max_chars_per_token: int = 0
    max_position_embeddings: int = 0


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def longest_token(tokenizer: Mapping[str, Any]) -> int:
    """The longest token of a tokenizer.json, in characters: its vocabulary
    (BPE and WordPiece: a mapping; Unigram: [piece, score] pairs) and its added
    tokens, as vLLM counts them (`max_chars_per_token`); 0 when it has none."""
    model = tokenizer.get("model")
    vocab = model.get("vocab") if isinstance(model, dict) else None
    pieces: list[str] = []
    if isinstance(vocab, dict):
        pieces += [p for p in vocab if isinstance(p, str)]
    elif isinstance(vocab, list):
        pieces += [p[0] for p in vocab if isinstance(p, list) and p and isinstance(p[0], str)]
    added = tokenizer.get("added_tokens")
    if isinstance(added, list):
        pieces += [t["content"] for t in added if isinstance(t, dict) and "content" in t]
    return max((len(p) for p in pieces), default=0)


def read_model_directory(path: str) -> ModelDirectory:
    """What the files in `path` say; defaults where they are missing or unreadable."""
    if not path:
        return ModelDirectory()
    root = Path(path)
    config = _read_json(root / "config.json")
    modalities = {"text"}
    max_positions = 0
    if isinstance(config, dict):
        if isinstance(config.get("vision_config"), dict):
            modalities.add("image")
        if isinstance(config.get("audio_config"), dict):
            modalities.add("audio")
        text_config = config.get("text_config")
        for source in (text_config if isinstance(text_config, dict) else {}, config):
            value = source.get("max_position_embeddings")
            if isinstance(value, int) and value > 0:
                max_positions = value
                break
    tokenizer = _read_json(root / "tokenizer.json")
    chars = longest_token(tokenizer) if isinstance(tokenizer, dict) else 0
    return ModelDirectory(frozenset(modalities), chars, max_positions)


# --- vLLM ----------------------------------------------------------------------------------


def _flag(args: Sequence[str], name: str) -> str | None:
    """The value of `--name VALUE` or `--name=VALUE` (the last one given), or
    "" for a flag given without a value; None when absent."""
    found: str | None = None
    for i, arg in enumerate(args):
        if arg == name:
            following = args[i + 1] if i + 1 < len(args) else ""
            found = "" if following.startswith("--") else following
        elif arg.startswith(name + "="):
            found = arg.split("=", 1)[1]
    return found


def vllm_runner(engine_args: Sequence[str], endpoints: frozenset[str]) -> str:
    """generate or pooling: from the flags when they say, else from the
    endpoints it serves; "" when neither tells."""
    runner = _flag(engine_args, "--runner")
    if runner in ("generate", "pooling"):
        return runner
    task = _flag(engine_args, "--task") or _flag(engine_args, "--convert")
    if task in ("embed", "embedding", "classify", "score", "reward"):
        return "pooling"
    if task == "generate":
        return "generate"
    if endpoints & _GENERATE_ENDPOINTS:
        return "generate"
    return "pooling" if endpoints else ""


def _mm_limits(engine_args: Sequence[str]) -> dict[str, Any]:
    text = _flag(engine_args, "--limit-mm-per-prompt")
    try:
        limits = json.loads(text) if text else {}
    except ValueError:
        return {}
    return limits if isinstance(limits, dict) else {}


def from_vllm(
    models: Mapping[str, Any],
    served_model: str,
    engine_args: Sequence[str],
    directory: ModelDirectory,
    version: str = "",
    paths: Iterable[str] | None = None,
) -> Capabilities:
    """vLLM's capabilities from its /v1/models, /version and /openapi.json paths
    (None when it serves no API document), its flags and its model directory."""
    entries = [e for e in models.get("data", []) if isinstance(e, dict)]
    own = next((e for e in entries if e.get("id") == served_model), None)
    max_len = own.get("max_model_len") if own is not None else None
    adapters = tuple(
        sorted(
            (LoraAdapter(str(e["id"]), str(e["parent"])) for e in entries if e.get("parent")),
            key=lambda a: a.name,
        )
    )
    endpoints = frozenset(ENDPOINT_OF_PATH[p] for p in paths or () if p in ENDPOINT_OF_PATH)
    runner = vllm_runner(engine_args, endpoints)
    generates = runner == "generate"
    modalities = set(directory.input_modalities)
    for kind, limit in _mm_limits(engine_args).items():
        if limit == 0:  # the operator turned this modality off
            modalities.discard(kind)
    return Capabilities(
        endpoints=endpoints,
        input_modalities=frozenset(modalities),
        # vLLM extracts tool calls only with a parser (tool_choice auto or named).
        tools=generates and _flag(engine_args, "--tool-call-parser") is not None
        if runner
        else None,
        structured_output=generates if runner else None,
        max_model_len=max_len if isinstance(max_len, int) and max_len > 0 else 0,
        max_chars_per_token=directory.max_chars_per_token,
        lora_adapters=adapters,
        engine="vllm",
        engine_version=version,
        runner=runner,
    )


# --- MLX-VLM and openai upstreams ----------------------------------------------------------


def _installed_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return ""


def for_mlx(directory: ModelDirectory, version: str) -> Capabilities:
    """MLX-VLM in the agent: chat only, text and (with a vision tower) images;
    no tools, no structured output."""
    return Capabilities(
        endpoints=frozenset({"chat_completions"}),
        input_modalities=directory.input_modalities & {"text", "image"},
        tools=False,
        structured_output=False,
        max_model_len=directory.max_position_embeddings,
        max_chars_per_token=directory.max_chars_per_token,
        engine="mlx_vlm",
        engine_version=version,
    )


def from_upstream(models: Mapping[str, Any], upstream_model: str) -> Capabilities:
    """An OpenAI-compatible upstream: what its /v1/models says of the model
    (max_model_len, when it is a vLLM or the like); the rest is not known."""
    entries = [e for e in models.get("data", []) if isinstance(e, dict)]
    own = next((e for e in entries if e.get("id") == upstream_model), None)
    max_len = own.get("max_model_len") if own is not None else None
    return Capabilities(
        max_model_len=max_len if isinstance(max_len, int) and max_len > 0 else 0,
        engine="openai",
    )


# --- asking the engine ---------------------------------------------------------------------


class Discovery(Protocol):
    """Learns what an engine can do."""

    async def discover(self) -> Capabilities:
        """Ask the engine now; DiscoveryError when it does not answer."""
        ...

    async def close(self) -> None: ...


class _Http:
    """aiohttp for these few questions (never the token path), each with a timeout."""

    def __init__(self, headers: Mapping[str, str], tls: ssl.SSLContext | None = None):
        self._headers = dict(headers)
        self._tls = tls
        self._session: aiohttp.ClientSession | None = None

    async def get_json(self, url: str, missing_ok: bool = False) -> Any:
        """The JSON at `url`; None for a 404 when `missing_ok`; DiscoveryError else."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S),
                connector=aiohttp.TCPConnector(ssl=self._tls if self._tls is not None else True),
            )
        try:
            async with self._session.get(url, headers=self._headers) as resp:
                if resp.status == 404 and missing_ok:
                    return None
                if resp.status != 200:
                    raise DiscoveryError(f"GET {url}: HTTP {resp.status}")
                return await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise DiscoveryError(f"GET {url}: {exc!r}") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class VllmDiscovery:
    """Asks a vLLM server (`root`: its URL without /v1) what it can do."""

    def __init__(
        self,
        root: str,
        api_key: str,
        served_model: str,
        engine_args: Sequence[str],
        model_path: str,
    ):
        self._root = root.rstrip("/")
        self._served_model = served_model
        self._engine_args = list(engine_args)
        self._model_path = model_path
        self._directory: ModelDirectory | None = None
        self._fixed: tuple[str, list[str] | None] | None = None
        """vLLM's version and API paths: they do not change while it runs."""
        self._http = _Http({"Authorization": f"Bearer {api_key}"} if api_key else {})

    async def discover(self) -> Capabilities:
        # Only /v1/models is asked again on a refresh (its LoRA adapters); a
        # real tokenizer.json is megabytes and openapi.json the whole API.
        if self._directory is None:
            self._directory = await asyncio.to_thread(read_model_directory, self._model_path)
        models = await self._http.get_json(self._root + "/v1/models")
        if not isinstance(models, dict):
            raise DiscoveryError("vLLM's /v1/models is not a JSON object")
        if self._fixed is None:
            version = await self._http.get_json(self._root + "/version", missing_ok=True)
            api = await self._http.get_json(self._root + "/openapi.json", missing_ok=True)
            paths = api.get("paths") if isinstance(api, dict) else None
            self._fixed = (
                str(version.get("version", "")) if isinstance(version, dict) else "",
                list(paths) if isinstance(paths, dict) else None,
            )
        version_text, api_paths = self._fixed
        return from_vllm(
            models, self._served_model, self._engine_args, self._directory,
            version=version_text, paths=api_paths,
        )  # fmt: skip

    async def close(self) -> None:
        await self._http.close()


class MlxDiscovery:
    """MLX-VLM runs in the agent: its model directory says it all."""

    def __init__(self, model_path: str):
        self._model_path = model_path
        self._learned: Capabilities | None = None

    async def discover(self) -> Capabilities:
        # Nothing here changes while the agent runs: read the directory once.
        if self._learned is None:
            directory = await asyncio.to_thread(read_model_directory, self._model_path)
            self._learned = for_mlx(directory, _installed_version("mlx-vlm"))
        return self._learned

    async def close(self) -> None:
        pass


@dataclass
class UpstreamDiscovery:
    """Asks an OpenAI-compatible upstream (`url` ends in /v1) about the model."""

    url: str
    upstream_model: str
    api_key: str = ""
    tls: ssl.SSLContext | None = None
    _http: _Http = field(init=False)

    def __post_init__(self) -> None:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._http = _Http(headers, self.tls)

    async def discover(self) -> Capabilities:
        models = await self._http.get_json(self.url.rstrip("/") + "/models")
        if not isinstance(models, dict):
            raise DiscoveryError("the upstream's /models is not a JSON object")
        return from_upstream(models, self.upstream_model)

    async def close(self) -> None:
        await self._http.close()
