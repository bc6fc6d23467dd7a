"""What a key (or all of an owner's keys together) may use: one value shared by
the controller, which stores and checks it, and the facades, which enforce it.

Zero means no limit, for each figure on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from kscope.v1 import keys_pb2


@dataclass(frozen=True)
class Limits:
    requests_per_minute: int = 0
    """Requests started in any 60-second window."""
    tokens_per_minute: int = 0
    """Prompt + completion tokens of requests that ended in any 60-second window."""
    max_concurrent: int = 0
    """Requests running at once."""
    daily_tokens: int = 0
    """Prompt + completion tokens per UTC day."""

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 0:
                raise ValueError(f"{f.name} must not be negative")

    @property
    def any(self) -> bool:
        """Whether any figure is limited."""
        return any(getattr(self, f.name) for f in fields(self))

    def looser_than(self, parent: Limits) -> list[str]:
        """The figures `self` sets higher than `parent` limits them (0 here: unset,
        see `within`)."""
        looser = []
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(parent, f.name)
            if theirs and mine > theirs:
                looser.append(f.name)
        return looser

    def within(self, parent: Limits) -> Limits:
        """These limits, with every figure `parent` limits and these do not taken from it."""
        values = {}
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(parent, f.name)
            values[f.name] = mine or theirs
        return Limits(**values)

    def to_proto(self) -> keys_pb2.Limits:
        return keys_pb2.Limits(
            requests_per_minute=self.requests_per_minute,
            tokens_per_minute=self.tokens_per_minute,
            max_concurrent=self.max_concurrent,
            daily_tokens=self.daily_tokens,
        )

    @classmethod
    def from_proto(cls, message: keys_pb2.Limits) -> Limits:
        return cls(
            requests_per_minute=message.requests_per_minute,
            tokens_per_minute=message.tokens_per_minute,
            max_concurrent=message.max_concurrent,
            daily_tokens=message.daily_tokens,
        )


NONE = Limits()
