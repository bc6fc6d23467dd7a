"""What an agent is doing now; reported to the controller in every load report."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kscope_common.request_stats import ModelStats
from node_agent.engines.base import EngineOutput, Usage


@dataclass
class Load:
    in_flight: int = 0
    """Requests the engine is working on (kept by node_agent/queue.py)."""
    queued: int = 0
    """Requests waiting in the queue for the engine."""
    draining: bool = False
    """New requests are refused."""
    stats: ModelStats = field(default_factory=ModelStats)
    """The requests that ended since start (the agent serves one model)."""

    @property
    def served(self) -> int:
        """Requests finished since start."""
        return self.stats.latency.count


class RequestClock:
    """One request's figures while it runs; `end` adds them to the agent's stats.
    `saw` runs for every engine output, so it only counts."""

    __slots__ = ("_first", "_start", "_stats", "_stream", "_usage")

    def __init__(self, stats: ModelStats, stream: bool):
        self._stats = stats
        self._stream = stream
        self._start = time.monotonic()
        self._first = 0.0
        self._usage: Usage | None = None

    def saw(self, output: EngineOutput) -> None:
        if not self._first:
            self._first = time.monotonic()
        if output.usage is not None:
            self._usage = output.usage

    def end(self, status: int) -> None:
        stats = self._stats
        stats.ended(status, time.monotonic() - self._start)
        if self._stream and self._first:
            stats.ttft.observe(self._first - self._start)
        if self._usage is not None:
            # The engine's own counts: request_life.py always asks it for usage.
            stats.generation_tokens += self._usage.completion_tokens
            stats.prompt_tokens += self._usage.prompt_tokens
