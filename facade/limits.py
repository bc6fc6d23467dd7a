"""Per-key and per-owner limits, enforced in the facade with no controller
round trip per request.

Each limited subject ("key:<id>", "owner:<name>") has counters on this
facade: request start times and token counts of the last 60 seconds (sliding
windows), requests running now, and tokens today not yet reported. About once
a second facade/usage.py reports them to the controller and gets back what the
other facades are using; a request is admitted when this facade's figures plus
the others' are under every limit. The others' figures are at most a report
old, so across N facades a limit can be passed by what N-1 facades admit in
that time (docs/usage.md has the worst case).

Token limits are checked before a request (its own tokens are known only when
it ends), so the request that crosses a token limit is served and the next one
is refused.

A key without limits, whose owner has none, costs one attribute check.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from facade.errors import ApiError
from kscope_common.limits import NONE, Limits

WINDOW_S = 60.0
DAY_S = 86400
FORGET_AFTER_S = 300.0
"""A subject with nothing running and nothing in its windows is forgotten after this."""


@dataclass
class Others:
    """What the other facades use, as the controller last said."""

    requests_last_minute: int = 0
    tokens_last_minute: int = 0
    in_flight: int = 0
    tokens_today: int = 0
    """Every facade's reported tokens today, this one's included."""


@dataclass
class Counter:
    """One subject's use on this facade."""

    subject: str
    limits: Limits
    who: str
    """Whose limit it is, in words ("this API key's owner")."""
    starts: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)
    tokens_in_window: int = 0
    in_flight: int = 0
    unreported_tokens: int = 0
    """Tokens today this facade has not yet reported (they are not in others.tokens_today)."""
    others: Others = field(default_factory=Others)
    used_at: float = 0.0

    def prune(self, now: float) -> None:
        edge = now - WINDOW_S
        while self.starts and self.starts[0] <= edge:
            self.starts.popleft()
        while self.tokens and self.tokens[0][0] <= edge:
            self.tokens_in_window -= self.tokens.popleft()[1]

    def requests_used(self) -> int:
        return len(self.starts) + self.others.requests_last_minute

    def tokens_used(self) -> int:
        return self.tokens_in_window + self.others.tokens_last_minute

    def tokens_today(self) -> int:
        return self.others.tokens_today + self.unreported_tokens

    def requests_reset_s(self, now: float) -> float:
        return self.starts[0] + WINDOW_S - now if self.starts else 1.0

    def tokens_reset_s(self, now: float) -> float:
        return self.tokens[0][0] + WINDOW_S - now if self.tokens else 1.0

    def refusal(self, now: float, wall: float) -> ApiError | None:
        """Why a request may not start now, or None."""
        limits, whose = self.limits, self.who
        if limits.requests_per_minute and self.requests_used() >= limits.requests_per_minute:
            return _refused(
                f"{whose} may send {limits.requests_per_minute} requests per minute",
                "requests_per_minute_exceeded", self.requests_reset_s(now),
            )  # fmt: skip
        if limits.tokens_per_minute and self.tokens_used() >= limits.tokens_per_minute:
            return _refused(
                f"{whose} may use {limits.tokens_per_minute} tokens per minute",
                "tokens_per_minute_exceeded", self.tokens_reset_s(now),
            )  # fmt: skip
        if (
            limits.max_concurrent
            and self.in_flight + self.others.in_flight >= limits.max_concurrent
        ):
            return _refused(
                f"{whose} may have {limits.max_concurrent} requests running at once",
                "concurrent_requests_exceeded", 1.0,
            )  # fmt: skip
        if limits.daily_tokens and self.tokens_today() >= limits.daily_tokens:
            return _refused(
                f"{whose} has used its daily budget of {limits.daily_tokens} tokens; "
                "it renews at 00:00 UTC",
                "daily_tokens_exceeded", DAY_S - wall % DAY_S,
            )  # fmt: skip
        return None


def _refused(message: str, code: str, retry_after_s: float) -> ApiError:
    return ApiError(
        429, f"Rate limit reached: {message}.", "rate_limit_error", code=code,
        retry_after_s=max(1, math.ceil(retry_after_s)),
    )  # fmt: skip


def duration(seconds: float) -> bytes:
    """OpenAI's reset format: "250ms", "12s", "1m30s"."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms".encode()
    whole = math.ceil(seconds)
    minutes, secs = divmod(whole, 60)
    return (f"{minutes}m{secs}s" if minutes else f"{secs}s").encode()


def ratelimit_headers(counters: Sequence[Counter], now: float) -> list[tuple[bytes, bytes]]:
    """OpenAI's x-ratelimit-* headers, from the tightest of the request's subjects."""
    headers: list[tuple[bytes, bytes]] = []
    by_requests = [c for c in counters if c.limits.requests_per_minute]
    if by_requests:
        c = min(by_requests, key=lambda c: c.limits.requests_per_minute - c.requests_used())
        limit = c.limits.requests_per_minute
        headers += [
            (b"x-ratelimit-limit-requests", str(limit).encode()),
            (b"x-ratelimit-remaining-requests", str(max(0, limit - c.requests_used())).encode()),
            (b"x-ratelimit-reset-requests", duration(c.requests_reset_s(now))),
        ]
    by_tokens = [c for c in counters if c.limits.tokens_per_minute]
    if by_tokens:
        c = min(by_tokens, key=lambda c: c.limits.tokens_per_minute - c.tokens_used())
        limit = c.limits.tokens_per_minute
        headers += [
            (b"x-ratelimit-limit-tokens", str(limit).encode()),
            (b"x-ratelimit-remaining-tokens", str(max(0, limit - c.tokens_used())).encode()),
            (b"x-ratelimit-reset-tokens", duration(c.tokens_reset_s(now))),
        ]
    return headers


class Admission:
    """A request let in: release() it once, with the tokens it used."""

    __slots__ = ("_counters", "headers")

    def __init__(self, counters: Sequence[Counter], headers: list[tuple[bytes, bytes]]):
        self._counters = counters
        self.headers = headers

    def release(self, tokens: int) -> None:
        if not self._counters:
            return
        now = time.monotonic()
        for counter in self._counters:
            counter.in_flight -= 1
            counter.used_at = now
            if tokens:
                counter.tokens.append((now, tokens))
                counter.tokens_in_window += tokens
                counter.unreported_tokens += tokens
        self._counters = ()


UNLIMITED = Admission((), [])


@dataclass(frozen=True)
class Subject:
    """A key or owner and its limits, as a request's grant names them."""

    name: str
    limits: Limits
    who: str = ""
    """Whose limit, in words; default: from the name ("key:…", "owner:…")."""


class Limiter:
    def __init__(self) -> None:
        self._counters: dict[str, Counter] = {}

    def admit(self, subjects: Sequence[Subject]) -> Admission | ApiError:
        if not subjects:
            return UNLIMITED
        now, wall = time.monotonic(), time.time()
        counters = []
        for subject in subjects:
            counter = self._counters.get(subject.name)
            if counter is None:
                who = subject.who or (
                    "this API key" if subject.name.startswith("key:") else "this API key's owner"
                )
                counter = self._counters[subject.name] = Counter(subject.name, subject.limits, who)
            counter.limits = subject.limits  # the grant's are the latest
            counter.prune(now)
            counter.used_at = now
            refusal = counter.refusal(now, wall)
            if refusal is not None:
                return _with_headers(refusal, ratelimit_headers([counter], now))
            counters.append(counter)
        for counter in counters:
            counter.starts.append(now)
            counter.in_flight += 1
        return Admission(counters, ratelimit_headers(counters, now))

    # --- the controller's side (facade/usage.py) ---------------------------------------------

    def loads(self) -> list[tuple[Counter, int]]:
        """Every live subject, with its unreported tokens at this moment; forgets idle ones."""
        now = time.monotonic()
        live = []
        for name, counter in list(self._counters.items()):
            counter.prune(now)
            idle = not counter.in_flight and not counter.starts and not counter.tokens
            if idle and now - counter.used_at > FORGET_AFTER_S and not counter.unreported_tokens:
                del self._counters[name]
                continue
            live.append((counter, counter.unreported_tokens))
        return live

    def reported(self, sent: Iterable[tuple[Counter, int]], others: dict[str, Others]) -> None:
        """A report reached the controller: its tokens are in `others` now."""
        for counter, tokens in sent:
            counter.unreported_tokens -= tokens
            counter.others = others.get(counter.subject, counter.others)


def _with_headers(error: ApiError, headers: list[tuple[bytes, bytes]]) -> ApiError:
    return replace(error, headers=tuple(headers))


__all__ = ["NONE", "Admission", "Limiter", "Subject"]
