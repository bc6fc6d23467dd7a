"""What an agent is doing now; reported to the controller in every load report."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Load:
    in_flight: int = 0
    """Requests the engine is working on (kept by node_agent/queue.py)."""
    queued: int = 0
    """Requests waiting in the queue for the engine."""
    draining: bool = False
    """New requests are refused."""
    served: int = 0
    """Requests finished since start."""
