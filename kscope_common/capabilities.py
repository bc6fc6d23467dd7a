"""What an instance (or a model) can do: one value for the agent that learns
it, the controller that keeps and merges it, and the facade that refuses what
a model cannot do (agent.proto Capabilities on the wire).

Empty, None and 0 fields are not known: nothing is refused on their account.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from kscope.v1 import agent_pb2

ENDPOINT_OF_PATH: Mapping[str, str] = {
    "/v1/chat/completions": "chat_completions",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "responses",
    "/tokenize": "tokenize",
    "/detokenize": "tokenize",
    "/score": "score",
    "/v1/score": "score",
    "/rerank": "rerank",
    "/v1/rerank": "rerank",
    "/v2/rerank": "rerank",
    "/pooling": "pooling",
    "/classify": "classify",
    "/v1/audio/transcriptions": "transcription",
    "/v1/audio/translations": "transcription",
}
"""Request paths by the endpoint they belong to (agent.proto ApiEndpoint)."""

_ENDPOINT_NAMES = {
    value: name.removeprefix("API_ENDPOINT_").lower()
    for name, value in agent_pb2.ApiEndpoint.items()
    if value != agent_pb2.API_ENDPOINT_UNSPECIFIED
}
_ENDPOINT_VALUES = {name: value for value, name in _ENDPOINT_NAMES.items()}
_MODALITY_NAMES = {
    value: name.removeprefix("MODALITY_").lower()
    for name, value in agent_pb2.Modality.items()
    if value != agent_pb2.MODALITY_UNSPECIFIED
}
_MODALITY_VALUES = {name: value for value, name in _MODALITY_NAMES.items()}


class LoraAdapter(NamedTuple):
    name: str
    parent: str
    """The model it adapts."""


@dataclass(frozen=True)
class Capabilities:
    endpoints: frozenset[str] = frozenset()
    """chat_completions, completions, embeddings, responses, tokenize, score,
    rerank, pooling, classify, transcription (ENDPOINT_OF_PATH's values)."""
    input_modalities: frozenset[str] = frozenset()
    """text, image, audio, video."""
    tools: bool | None = None
    structured_output: bool | None = None
    max_model_len: int = 0
    max_chars_per_token: int = 0
    """The tokenizer's longest token in characters (vLLM's bound for prompts)."""
    lora_adapters: tuple[LoraAdapter, ...] = ()
    """The LoRA adapters it has loaded, sorted."""
    engine: str = ""
    engine_version: str = ""
    runner: str = ""
    """vLLM's runner: generate or pooling."""

    @classmethod
    def from_proto(cls, message: agent_pb2.Capabilities) -> Capabilities:
        """From the wire; values this side does not know (a newer peer's) are left out."""
        return cls(
            endpoints=frozenset(
                _ENDPOINT_NAMES[e] for e in message.endpoints if e in _ENDPOINT_NAMES
            ),
            input_modalities=frozenset(
                _MODALITY_NAMES[m] for m in message.input_modalities if m in _MODALITY_NAMES
            ),
            tools=message.tools if message.HasField("tools") else None,
            structured_output=(
                message.structured_output if message.HasField("structured_output") else None
            ),
            max_model_len=message.max_model_len,
            max_chars_per_token=message.max_chars_per_token,
            lora_adapters=tuple(
                sorted(LoraAdapter(a.name, a.parent) for a in message.lora_adapters)
            ),
            engine=message.engine,
            engine_version=message.engine_version,
            runner=message.runner,
        )

    def to_proto(self) -> agent_pb2.Capabilities:
        message = agent_pb2.Capabilities(
            endpoints=sorted(_ENDPOINT_VALUES[e] for e in self.endpoints),
            input_modalities=sorted(_MODALITY_VALUES[m] for m in self.input_modalities),
            max_model_len=self.max_model_len,
            max_chars_per_token=self.max_chars_per_token,
            lora_adapters=[
                agent_pb2.LoraAdapter(name=a.name, parent=a.parent) for a in self.lora_adapters
            ],
            engine=self.engine,
            engine_version=self.engine_version,
            runner=self.runner,
        )
        if self.tools is not None:
            message.tools = self.tools
        if self.structured_output is not None:
            message.structured_output = self.structured_output
        return message

    def as_json(self) -> dict[str, Any]:
        """For /v1/models: what is known, by OpenAI-ish names (null: not known)."""
        return {
            "endpoints": sorted(self.endpoints) or None,
            "input_modalities": sorted(self.input_modalities) or None,
            "tools": self.tools,
            "structured_output": self.structured_output,
            "max_model_len": self.max_model_len or None,
            "lora_adapters": [a.name for a in self.lora_adapters],
            "engine": self.engine or None,
            "engine_version": self.engine_version or None,
            "runner": self.runner or None,
        }
