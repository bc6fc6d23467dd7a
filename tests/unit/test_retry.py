"""The one backoff every reconnect loop uses."""

from __future__ import annotations

import random

import pytest

from controller.launchers.ssh import RemoteRefused, RemoteUnavailable
from kscope_common.retry import RECONNECT, SLURM, Backoff, RetryLater, RetryPolicy


def test_waits_double_up_to_the_cap_and_reset_after_a_success() -> None:
    backoff = Backoff(RetryPolicy(initial_s=0.1, cap_s=1.0, jitter=0))
    assert [round(backoff.next_delay(), 3) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert backoff.failures == 6
    backoff.reset()
    assert backoff.next_delay() == 0.1


def test_jitter_spreads_each_wait_within_its_fraction() -> None:
    backoff = Backoff(RetryPolicy(initial_s=1.0, cap_s=1.0, jitter=0.2), random.Random(7))
    waits = [backoff.next_delay() for _ in range(200)]
    assert all(0.8 <= w <= 1.2 for w in waits)
    assert len({round(w, 6) for w in waits}) > 100  # not in lock-step


def test_the_shared_policies() -> None:
    assert (RECONNECT.initial_s, RECONNECT.cap_s) == (0.1, 1.0)
    assert (SLURM.initial_s, SLURM.cap_s) == (1.0, 30.0)


@pytest.mark.parametrize(
    "fields",
    [{"initial_s": 0, "cap_s": 1}, {"initial_s": 2, "cap_s": 1},
     {"initial_s": 1, "cap_s": 2, "multiplier": 0.5}, {"initial_s": 1, "cap_s": 2, "jitter": 1}],
)  # fmt: skip
def test_unusable_policies_are_refused(fields: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="retry policy"):
        RetryPolicy(**fields)


def test_remote_failures_carry_their_retry_hint() -> None:
    failure = RemoteUnavailable("login node down", retry_in_s=4.0)
    assert isinstance(failure, RetryLater) and failure.retry_in_s == 4.0
    assert isinstance(RemoteRefused("bad host key"), RetryLater)
