"""OpenAI chat completions for in-process engines: the request checked and
translated, and the answer shaped as OpenAI bodies and stream chunks.

Pure code, no engine in it. Every field the engine cannot honour is refused
with a 400 naming it (`param`), never dropped silently: a client that asks for
tools or logprobs learns at once that this model does not offer them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from node_agent.engines.base import EngineError, Usage

DEFAULT_MAX_TOKENS = 512
"""Completion tokens when a request sets neither max_tokens nor
max_completion_tokens (mlx_lm.server's default)."""

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def invalid(message: str, param: str | None, code: str = "invalid_parameter") -> EngineError:
    """A 400 for the client, OpenAI-shaped."""
    return EngineError(400, message, error_type="invalid_request_error", param=param, code=code)


def unsupported(param: str, what: str) -> EngineError:
    return invalid(f"{what} is not supported by this model's engine (mlx_vlm)", param,
                   code="unsupported_parameter")  # fmt: skip


@dataclass(frozen=True)
class ChatRequest:
    """A chat request in the terms an in-process engine needs."""

    model: str
    messages: list[dict[str, Any]]
    """Roles system/user/assistant; content a string, or a list of
    {"type": "text", "text"} and {"type": "image"} parts in order."""
    image_urls: list[str]
    """The URL of each {"type": "image"} part, in prompt order."""
    max_tokens: int
    stop: list[str] = field(default_factory=list)
    include_usage: bool = False
    seed: int | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    """Sampling keyword arguments for the engine (temperature, top_p, ...)."""


def _number(lo: float, hi: float, lo_open: bool = False) -> Callable[[str, object], float]:
    def check(name: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise invalid(f"'{name}' must be a number", name)
        if value > hi or value < lo or (lo_open and value == lo):
            bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
            raise invalid(f"'{name}' must be in {bound}, got {value}", name)
        return float(value)

    return check


def _integer(lo: int) -> Callable[[str, object], int]:
    def check(name: str, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise invalid(f"'{name}' must be an integer", name)
        if value < lo:
            raise invalid(f"'{name}' must be at least {lo}, got {value}", name)
        return value

    return check


# Sampling parameters MLX-VLM honours, with their checks; passed to it by name.
_SAMPLING: dict[str, Callable[[str, object], object]] = {
    "temperature": _number(0.0, 2.0),
    "top_p": _number(0.0, 1.0, lo_open=True),
    "min_p": _number(0.0, 1.0),
    "presence_penalty": _number(-2.0, 2.0),
    "frequency_penalty": _number(-2.0, 2.0),
    "repetition_penalty": _number(0.0, 10.0, lo_open=True),
}


def _accept_only(allowed: tuple[object, ...], what: str) -> Callable[[str, object], None]:
    """A field that may be sent only with values that ask for nothing we lack."""

    def check(name: str, value: object) -> None:
        if value not in allowed:
            raise unsupported(name, what)

    return check


# Fields accepted only with these values (the defaults of the OpenAI API).
_DEFAULT_ONLY: dict[str, Callable[[str, object], None]] = {
    "n": _accept_only((1,), "'n' other than 1"),
    "logprobs": _accept_only((False,), "logprobs"),
    "top_logprobs": _accept_only((0,), "top_logprobs"),
    "tools": _accept_only(([],), "tool calling"),
    "tool_choice": _accept_only(("none",), "tool calling"),
    "parallel_tool_calls": _accept_only((True, False), "tool calling"),
    "functions": _accept_only(([],), "function calling"),
    "function_call": _accept_only(("none",), "function calling"),
    "response_format": _accept_only(({"type": "text"},), "a response_format other than text"),
    "store": _accept_only((False,), "stored completions"),
    "echo": _accept_only((False,), "echo"),
}

# Fields read elsewhere or that only label the request.
_HANDLED = {
    "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
    "stop", "seed", "top_k", "logit_bias", "skip_special_tokens", "user",
    *_SAMPLING, *_DEFAULT_ONLY,
}  # fmt: skip


def parse_chat_request(body: bytes, served_model: str) -> ChatRequest:
    """Check an OpenAI chat request and translate it; raise EngineError(400)."""
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"request body is not valid JSON: {exc}", None, "invalid_json") from exc
    if not isinstance(request, dict):
        raise invalid("request body must be a JSON object", None, "invalid_json")
    unknown = sorted(k for k, v in request.items() if k not in _HANDLED and v is not None)
    if unknown:
        raise unsupported(unknown[0], f"'{unknown[0]}'")
    for name, check in _DEFAULT_ONLY.items():
        if request.get(name) is not None:
            check(name, request[name])
    messages, image_urls = _messages(request.get("messages"))
    sampling: dict[str, Any] = {
        name: check(name, request[name])
        for name, check in _SAMPLING.items()
        if request.get(name) is not None
    }
    if request.get("top_k") is not None:
        top_k = _integer(-1)("top_k", request["top_k"])
        sampling["top_k"] = max(top_k, 0)  # vLLM's -1 and MLX's 0 both mean "off"
    if request.get("logit_bias") is not None:
        sampling["logit_bias"] = _logit_bias(request["logit_bias"])
    skip_special = request.get("skip_special_tokens", True)
    if not isinstance(skip_special, bool):
        raise invalid("'skip_special_tokens' must be a boolean", "skip_special_tokens")
    sampling["skip_special_tokens"] = skip_special
    model = request.get("model")
    return ChatRequest(
        model=model if isinstance(model, str) and model else served_model,
        messages=messages,
        image_urls=image_urls,
        max_tokens=_max_tokens(request),
        stop=_stop(request.get("stop")),
        include_usage=_include_usage(request.get("stream_options")),
        seed=_integer(-(2**63))("seed", request["seed"])
        if request.get("seed") is not None
        else None,
        sampling=sampling,
    )


def _max_tokens(request: dict[str, Any]) -> int:
    for name in ("max_completion_tokens", "max_tokens"):
        if request.get(name) is not None:
            return _integer(1)(name, request[name])
    return DEFAULT_MAX_TOKENS


def _stop(value: object) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise invalid("'stop' must be a non-empty string or a list of them", "stop")
    if len(stops) > 16:
        raise invalid("'stop' may hold at most 16 strings", "stop")
    return stops


def _include_usage(options: object) -> bool:
    if options is None:
        return False
    if not isinstance(options, dict):
        raise invalid("'stream_options' must be an object", "stream_options")
    for key, value in options.items():
        if key == "include_usage":
            if not isinstance(value, bool):
                raise invalid("'include_usage' must be a boolean", "stream_options")
        elif value not in (None, False):
            raise unsupported("stream_options", f"stream_options.{key}")
    return bool(options.get("include_usage"))


def _logit_bias(value: object) -> dict[int, float]:
    if not isinstance(value, dict):
        raise invalid("'logit_bias' must map token ids to numbers", "logit_bias")
    bias: dict[int, float] = {}
    for key, weight in value.items():
        if not str(key).isdigit():
            raise invalid(f"'logit_bias' key {key!r} is not a token id", "logit_bias")
        bias[int(key)] = _number(-100.0, 100.0)("logit_bias", weight)
    return bias


def _messages(value: object) -> tuple[list[dict[str, Any]], list[str]]:
    if not isinstance(value, list) or not value:
        raise invalid("'messages' must be a non-empty array", "messages")
    messages: list[dict[str, Any]] = []
    images: list[str] = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(f"{where} must be an object", where)
        role = _ROLES.get(str(message.get("role")))
        if role is None:
            if message.get("role") in ("tool", "function"):
                raise unsupported(f"{where}.role", "tool calling")
            raise invalid(f"{where}.role must be system, developer, user or assistant", where)
        for key, item in message.items():
            if key == "tool_calls" and item not in (None, []):
                raise unsupported(f"{where}.tool_calls", "tool calling")
            if key not in ("role", "content", "name", "tool_calls"):
                raise unsupported(f"{where}.{key}", f"'{key}' in a message")
        content = _content(message.get("content"), role, where, images)
        messages.append({"role": role, "content": content})
    return messages, images


def _content(value: object, role: str, where: str, images: list[str]) -> str | list[dict[str, Any]]:
    if value is None and role == "assistant":
        return ""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise invalid(f"{where}.content must be a string or an array of parts", where)
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(value):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part, dict) and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url" and isinstance(part, dict):
            if role != "user":
                raise invalid(f"{at}: images are allowed in user messages only", at)
            images.append(_image_url(part.get("image_url"), at))
            parts.append({"type": "image"})
        elif kind in ("text", "image_url"):
            raise invalid(f"{at} is not a valid {kind} part", at)
        else:
            raise unsupported(at, f"content part type {kind!r}")
    if all(p["type"] == "text" for p in parts):
        return "\n".join(p["text"] for p in parts)  # as vLLM joins text-only parts
    return parts


def _image_url(value: object, at: str) -> str:
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise invalid(f"{at}.image_url.url must be a non-empty string", at)
    return url


class StopMatcher:
    """Cuts generated text at the first stop string. Streaming text is held back
    only while it could still be the start of a stop string."""

    def __init__(self, stops: list[str]):
        self._stops = stops
        self._pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Text that is safe to emit now, and whether a stop string matched."""
        if not self._stops:
            return text, False
        pending = self._pending + text
        cut = min((i for i in (pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._pending = ""
            return pending[:cut], True
        keep = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(pending)), keep, -1):
                if pending.endswith(stop[:k]):
                    keep = k
                    break
        self._pending = pending[len(pending) - keep :]
        return pending[: len(pending) - keep], False

    def flush(self) -> str:
        """What was held back, once generation ended without a match."""
        rest, self._pending = self._pending, ""
        return rest


class ChatRenderer:
    """OpenAI chat.completion bodies and chat.completion.chunk events for one request."""

    def __init__(self, model: str, include_usage: bool):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage

    def _chunk(self, choices: list[dict[str, Any]], usage: Usage | None = None) -> bytes:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = _usage(usage) if usage is not None else None
        return orjson.dumps(chunk)

    def delta(self, delta: dict[str, str], finish_reason: str | None = None) -> bytes:
        """One streamed choice delta (the first carries the role)."""
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self._chunk([choice])

    def usage_chunk(self, usage: Usage) -> bytes:
        """The last chunk when the client asked for stream_options.include_usage."""
        return self._chunk([], usage)

    def completion(self, text: str, finish_reason: str, usage: Usage) -> bytes:
        """The whole non-streaming answer."""
        return orjson.dumps(
            {
                "id": self.id,
                "object": "chat.completion",
                "created": self.created,
                "model": self.model,
                "system_fingerprint": None,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": None,
                        "finish_reason": finish_reason,
                    }
                ],
                "usage": _usage(usage),
            }
        )


def _usage(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }
