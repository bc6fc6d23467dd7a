"""The plain request figures behind /metrics and the agents' telemetry totals."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from kscope_common.request_stats import CANCELLED, Histogram, RequestStats, RequestTotals
from tests.procs import parse_metrics


def test_histogram_buckets_are_cumulative_and_bounds_inclusive() -> None:
    histogram = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 7.0):
        histogram.observe(value)
    assert histogram.cumulative() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    assert histogram.count == 4 and histogram.sum == 7.65


def test_errors_count_error_answers_but_not_cancels() -> None:
    stats = RequestStats()
    model = stats.of("m")
    for status in (200, 400, 503, CANCELLED, 200):
        model.ended(status, 0.2)
    totals = stats.totals()
    assert (totals.served, totals.errors) == (5, 2)
    assert model.by_status == {200: 2, 400: 1, 503: 1, CANCELLED: 1}


def test_totals_add_and_subtract_field_by_field() -> None:
    a = RequestTotals(5, 1, 50, 0.5, 4, 2.0)
    b = RequestTotals(2, 1, 20, 0.25, 1, 0.5)
    assert a - b == RequestTotals(3, 0, 30, 0.25, 3, 1.5)
    assert b + (a - b) == a


def test_families_parse_with_prometheus_client() -> None:
    stats = RequestStats()
    model = stats.of("m")
    model.ended(200, 0.3)
    model.ttft.observe(0.02)
    model.generation_tokens += 7

    class Families(Collector):
        def collect(self):  # type: ignore[no-untyped-def]
            return stats.families("kscope_test", "a test")

    registry = CollectorRegistry()
    registry.register(Families())
    samples = parse_metrics(generate_latest(registry).decode())
    assert samples[("kscope_test_requests_total", (("model", "m"), ("status", "200")))] == 1
    assert samples[("kscope_test_request_duration_seconds_bucket",
                    (("le", "0.25"), ("model", "m")))] == 0  # fmt: skip
    assert samples[("kscope_test_request_duration_seconds_bucket",
                    (("le", "0.5"), ("model", "m")))] == 1  # fmt: skip
    assert samples[("kscope_test_time_to_first_token_seconds_count", (("model", "m"),))] == 1
    assert samples[("kscope_test_generation_tokens_total", (("model", "m"),))] == 7
