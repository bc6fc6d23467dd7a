"""One way to wait between attempts: exponential backoff with a cap and jitter.

Every reconnect loop in KScope (agent → controller, the facade's route and key
watches, matching SLURM jobs after a restart, the SSH connection to the login
node) uses a `Backoff` made from a frozen `RetryPolicy`, so the constants live
in one place and many clients that lost the same server do not come back in
lock-step. An error may carry its own hint (`RetryLater.retry_in_s`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """How long to wait before the next attempt."""

    initial_s: float
    """The first wait."""
    cap_s: float
    """No wait is longer (before jitter)."""
    multiplier: float = 2.0
    """Each failure multiplies the wait by this."""
    jitter: float = 0.2
    """Each wait is spread by up to this fraction either way (0: exact)."""

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.cap_s or self.multiplier < 1 or not 0 <= self.jitter < 1:
            raise ValueError(f"not a usable retry policy: {self}")


RECONNECT = RetryPolicy(initial_s=0.1, cap_s=1.0)
"""Long-lived streams to the controller: found again within a second or two."""
SLURM = RetryPolicy(initial_s=1.0, cap_s=30.0)
"""The login node and SLURM: polite to a system others share."""


class RetryLater(Exception):
    """A failure worth retrying, with when (seconds from now) if the raiser knows."""

    def __init__(self, message: str, retry_in_s: float = 1.0):
        super().__init__(message)
        self.retry_in_s = retry_in_s


class Backoff:
    """The waits of one retry loop; `reset()` after a success."""

    def __init__(self, policy: RetryPolicy, rng: random.Random | None = None):
        self.policy = policy
        self._rng = rng or random.Random()
        self.failures = 0

    def next_delay(self) -> float:
        """The wait before the next attempt (counts a failure)."""
        p = self.policy
        base = min(p.cap_s, p.initial_s * p.multiplier**self.failures)
        self.failures += 1
        if not p.jitter:
            return base
        return base * (1 + self._rng.uniform(-p.jitter, p.jitter))

    def reset(self) -> None:
        self.failures = 0
