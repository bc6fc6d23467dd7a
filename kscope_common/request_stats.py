"""Per-model request figures kept as plain numbers where requests end (facade
and agent), turned into Prometheus families only when /metrics is scraped, and
summed into the totals an agent reports to the controller's telemetry."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import astuple, dataclass

from prometheus_client.core import HistogramMetricFamily, Metric

from kscope_common.metrics import counter

LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CANCELLED = 499
"""The status of a request its client gave up on (nginx's convention)."""


class Histogram:
    """Bucket counts, a sum and a count; observing is one bisect."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus `le` buckets, +Inf last."""
        out: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip((*map(repr, self.bounds), "+Inf"), list(self.counts), strict=True):
            total += n
            out.append((bound, total))
        return out


class ModelStats:
    """One model's requests, as they ended."""

    __slots__ = ("by_status", "errors", "generation_tokens", "latency", "prompt_tokens", "ttft")

    def __init__(self) -> None:
        self.by_status: dict[int, int] = {}
        self.latency = Histogram(LATENCY_BUCKETS_S)
        self.ttft = Histogram(TTFT_BUCKETS_S)
        self.generation_tokens = 0
        self.prompt_tokens = 0
        self.errors = 0
        """Ended with an error answer (status 400 and above, cancels not counted)."""

    def ended(self, status: int, latency_s: float) -> None:
        self.by_status[status] = self.by_status.get(status, 0) + 1
        self.latency.observe(latency_s)
        if status >= 400 and status != CANCELLED:
            self.errors += 1

    def totals(self) -> RequestTotals:
        return RequestTotals(
            served=self.latency.count,
            errors=self.errors,
            generation_tokens=self.generation_tokens,
            ttft_seconds_sum=self.ttft.sum,
            ttft_count=self.ttft.count,
            latency_seconds_sum=self.latency.sum,
        )


@dataclass(frozen=True)
class RequestTotals:
    """Sums since a process started; the controller turns them into rates."""

    served: int = 0
    errors: int = 0
    generation_tokens: int = 0
    ttft_seconds_sum: float = 0.0
    ttft_count: int = 0
    latency_seconds_sum: float = 0.0

    def __add__(self, other: RequestTotals) -> RequestTotals:
        return RequestTotals(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    def __sub__(self, other: RequestTotals) -> RequestTotals:
        return RequestTotals(*(a - b for a, b in zip(astuple(self), astuple(other), strict=True)))


class RequestStats:
    """Every model's ModelStats, created on first use."""

    def __init__(self) -> None:
        self.models: dict[str, ModelStats] = {}

    def of(self, model: str) -> ModelStats:
        stats = self.models.get(model)
        if stats is None:
            stats = self.models[model] = ModelStats()
        return stats

    def totals(self) -> RequestTotals:
        return sum((m.totals() for m in list(self.models.values())), RequestTotals())

    def families(self, prefix: str, what: str, tokens: bool = True) -> Iterable[Metric]:
        """`prefix`_requests_total{model,status}, _request_duration_seconds and
        _time_to_first_token_seconds histograms, and with `tokens`
        _generation_tokens_total and _prompt_tokens_total. `what` says in words
        where they are measured."""
        models = dict(self.models)
        yield counter(
            f"{prefix}_requests",
            f"Inference requests that ended, by model and HTTP status ({CANCELLED}: the"
            f" client went away); {what}.",
            ("model", "status"),
            {(m, str(s)): n for m, st in models.items() for s, n in dict(st.by_status).items()},
        )
        for name, doc, pick in (
            ("request_duration_seconds", "Time from request to its last byte", _latency),
            ("time_to_first_token_seconds", "Time from request to first token (streams)", _ttft),
        ):
            family = HistogramMetricFamily(f"{prefix}_{name}", f"{doc}; {what}.", labels=["model"])
            for model, stats in models.items():
                histogram = pick(stats)
                family.add_metric([model], histogram.cumulative(), histogram.sum)
            yield family
        if not tokens:
            return
        yield counter(
            f"{prefix}_generation_tokens",
            "Completion tokens generated (the engine's usage, else one per streamed chunk);"
            f" {what}.",
            ("model",),
            {(m,): st.generation_tokens for m, st in models.items()},
        )
        yield counter(
            f"{prefix}_prompt_tokens",
            f"Prompt tokens, from the engine's usage when it reports one; {what}.",
            ("model",),
            {(m,): st.prompt_tokens for m, st in models.items()},
        )


def _latency(stats: ModelStats) -> Histogram:
    return stats.latency


def _ttft(stats: ModelStats) -> Histogram:
    return stats.ttft
