"""Can this model serve this request? Decided in the facade, before routing.

Pure: the request's path, its parsed JSON body and what the model can do (its
agents learn it from their engines; the controller pushes it with the routes,
control.proto `Model.capabilities` and `Endpoint.capabilities`) in; None or
the `ApiError` the client gets out. Nothing here reads the network or a clock.

- An endpoint the model does not offer: 404, "model 'X' does not offer /v1/…".
- Input it does not accept (image, audio or video parts), `tools` to a model
  without tool calling, `response_format` json_schema / json_object to one
  without structured output: 400 naming what is missing.
- A prompt plainly longer than the model's context: 400 in vLLM's own words
  and shape (vllm/renderers/params.py `_text_len_check`, `_token_len_check`;
  type BadRequestError, code 400). "Plainly" is vLLM's own bound: more
  characters than max_model_len times the tokenizer's longest token (no
  tokenization can then fit), or more token ids than max_model_len. When the
  tokenizer is not known (an openai upstream), its longest token is taken to
  be FALLBACK_CHARS_PER_TOKEN characters. Only what the gateway can count
  without a tokenizer is counted (a chat's message texts, not its template),
  so whatever this refuses the engine would refuse too.

A field the capabilities leave empty is not known: nothing is refused on its
account, and the engine judges. `Requirement.met_by` is the same judgement
for one instance: RouteTable.pick uses it to skip instances that cannot serve
the request when a model's instances differ.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from facade.errors import ApiError
from kscope_common.capabilities import ENDPOINT_OF_PATH, Capabilities

FALLBACK_CHARS_PER_TOKEN = 32
"""The longest token assumed for a tokenizer nobody described: far above any
natural text's characters per token (about 4 in English), so a prompt past
max_model_len times this is too long for any tokenizer one would serve."""


_PART_MODALITY = {
    "image_url": "image",
    "input_image": "image",
    "image": "image",
    "image_embeds": "image",
    "input_audio": "audio",
    "audio_url": "audio",
    "audio": "audio",
    "video_url": "video",
    "video": "video",
}
"""Content part types (chat and Responses API) by the input they carry."""


@dataclass(frozen=True)
class Requirement:
    """What one request needs of whoever serves it."""

    path: str
    endpoint: str | None = None
    """The endpoint its path belongs to; None: a path this table does not know."""
    modalities: frozenset[str] = frozenset()
    """Inputs beyond text: image, audio, video."""
    tools: bool = False
    structured_output: str = ""
    """The response_format type it asks for (json_schema, json_object) or ""."""
    longest_text: int = 0
    """Characters of its longest prompt (a chat's message texts together)."""
    longest_tokens: int = 0
    """Token ids of its longest prompt given as token ids."""

    def met_by(self, capabilities: Capabilities | None) -> bool:
        """Whether an instance that can do this may serve the request."""
        return capabilities is None or _unmet(self, capabilities, "") is None


# --- what a request needs ------------------------------------------------------------------


def _parts_modalities(content: Any, found: set[str]) -> int:
    """Add the modalities of a message's content parts to `found`; return its
    text's length in characters."""
    if isinstance(content, str):
        return len(content)
    chars = 0
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            if kind in _PART_MODALITY:
                found.add(_PART_MODALITY[kind])
            text = part.get("text")
            if isinstance(text, str):
                chars += len(text)
    return chars


def _messages(items: Any, found: set[str]) -> int:
    """The modalities (into `found`) and text length of chat messages or
    Responses API input items."""
    chars = 0
    if isinstance(items, list):
        for item in items:
            if isinstance(item, dict):
                chars += _parts_modalities(item.get("content"), found)
    return chars


def _prompts(value: Any) -> tuple[int, int]:
    """(longest text, longest token-id list) of a prompt / input field: a
    string, token ids, or a list of either."""
    if isinstance(value, str):
        return len(value), 0
    if not isinstance(value, list) or not value:
        return 0, 0
    if all(isinstance(v, int) for v in value):
        return 0, len(value)
    text = tokens = 0
    for item in value:
        if isinstance(item, str):
            text = max(text, len(item))
        elif isinstance(item, list) and all(isinstance(v, int) for v in item):
            tokens = max(tokens, len(item))
    return text, tokens


def _needs_tools(request: Mapping[str, Any]) -> bool:
    tools = request.get("tools") or request.get("functions")
    return bool(tools) and request.get("tool_choice") != "none"


_SPECIAL = re.compile(
    rb'"(?:'
    + b"|".join(re.escape(k.encode()) for k in _PART_MODALITY)
    + rb'|tools|functions|response_format)"'
)
"""A body without any of these asks for nothing beyond its endpoint and length."""
_BARE: dict[str, Requirement] = {}


def requirement_for(
    path: str, body: bytes, request: Mapping[str, Any] | None, caps: Capabilities | None
) -> Requirement:
    """`requirement_of`, or at once the bare requirement of `path` when nothing
    in the body can matter: nothing is known of the model, or the body has no
    part type, tools or response_format and is shorter in bytes than the
    context is in tokens (no prompt in it can be too long). Most requests."""
    fits = caps is None or caps.max_model_len <= 0 or len(body) <= caps.max_model_len
    if caps is None or (fits and _SPECIAL.search(body) is None):
        bare = _BARE.get(path)
        if bare is None:
            bare = _BARE[path] = Requirement(path, ENDPOINT_OF_PATH.get(path))
        return bare
    return requirement_of(path, request)


def requirement_of(path: str, request: Mapping[str, Any] | None) -> Requirement:
    """What the request at `path` with body `request` (its parsed JSON; None
    for a body that is not JSON, such as an audio upload) needs."""
    endpoint = ENDPOINT_OF_PATH.get(path)
    if not request:
        return Requirement(path, endpoint)
    found: set[str] = set()
    text = tokens = 0
    if "messages" in request:
        text = _messages(request["messages"], found)
    prompt_field = {"completions": "prompt", "embeddings": "input"}.get(endpoint or "")
    if prompt_field and prompt_field in request:
        text, tokens = _prompts(request[prompt_field])
    elif endpoint == "responses":
        given = request.get("input")
        text = len(given) if isinstance(given, str) else _messages(given, found)
    if request.get("truncate_prompt_tokens") is not None:
        text = tokens = 0  # the engine cuts the prompt to fit: never too long
    response_format = request.get("response_format")
    structured = ""
    if isinstance(response_format, dict):
        kind = response_format.get("type")
        if kind in ("json_schema", "json_object"):
            structured = kind
    return Requirement(
        path, endpoint, frozenset(found), _needs_tools(request), structured, text, tokens
    )


# --- the judgement ---------------------------------------------------------------------------


def _too_long(requirement: Requirement, caps: Capabilities) -> ApiError | None:
    """vLLM's own 400 for a prompt no tokenization can fit, or None."""
    max_len = caps.max_model_len
    if max_len <= 0:
        return None
    if requirement.longest_tokens > max_len:
        count = requirement.longest_tokens
        # vLLM's tokenizer stops at max_len + 1, hence its "at least".
        at_least = "at least " if count == max_len + 1 else ""
        return _vllm_error(
            f"This model's maximum context length is {max_len} tokens. However, your prompt "
            f"contains {at_least}{count} input tokens, which exceeds this limit even without "
            f"any output tokens. Please reduce the length of the input prompt.",
            "input_tokens",
            count,
        )
    bound = max_len * (caps.max_chars_per_token or FALLBACK_CHARS_PER_TOKEN)
    if requirement.longest_text > bound:
        chars = requirement.longest_text
        return _vllm_error(
            f"This model's maximum context length is {max_len} tokens. However, your prompt "
            f"contains {chars} characters (more than {bound} characters, which is the upper "
            f"bound for {max_len} input tokens). Please reduce the length of the input prompt.",
            "input_text",
            chars,
        )
    return None


def _vllm_error(message: str, param: str, value: int) -> ApiError:
    """An error as vLLM 0.32 words and shapes it: its VLLMValidationError's text
    ends with the parameter and value; `code` is the HTTP status."""
    message = f"{message} (parameter={param}, value={value})"
    body = {"message": message, "type": "BadRequestError", "param": param, "code": 400}
    return ApiError(400, message, "BadRequestError", param=param, raw_error=orjson.dumps(body))


def _unmet(requirement: Requirement, caps: Capabilities, model: str) -> ApiError | None:
    """The refusal for the first thing `caps` lacks, or None."""
    if requirement.endpoint and caps.endpoints and requirement.endpoint not in caps.endpoints:
        return ApiError(
            404, f"model '{model}' does not offer {requirement.path}",
            code="unsupported_endpoint", param="model",
        )  # fmt: skip
    if caps.input_modalities:
        for modality in sorted(requirement.modalities - caps.input_modalities):
            return ApiError(
                400, f"model '{model}' does not accept {modality} input",
                param="messages", code="unsupported_input",
            )  # fmt: skip
    if requirement.tools and caps.tools is False:
        return ApiError(
            400, f"model '{model}' does not support tool calling ('tools')",
            param="tools", code="unsupported_parameter",
        )  # fmt: skip
    if requirement.structured_output and caps.structured_output is False:
        return ApiError(
            400,
            f"model '{model}' does not support structured output "
            f"(response_format {requirement.structured_output})",
            param="response_format", code="unsupported_parameter",
        )  # fmt: skip
    return _too_long(requirement, caps)


def refusal(
    model: str, requirement: Requirement, capabilities: Capabilities | None
) -> ApiError | None:
    """The error `model` gives for a request with this requirement, before any
    instance sees it; None when it may go on (also when nothing is known)."""
    if capabilities is None:
        return None
    return _unmet(requirement, capabilities, model)


def check(
    path: str, request: Mapping[str, Any] | None, model: str, capabilities: Capabilities | None
) -> ApiError | None:
    """`refusal` for the request at `path` with this parsed body, in one call."""
    return refusal(model, requirement_of(path, request), capabilities)
