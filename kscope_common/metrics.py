"""Prometheus metrics: each process keeps plain counters where the work happens
and a collector turns them into metric families only when /metrics is scraped,
so nothing on the token path looks up labels or takes locks."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    ProcessCollector,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from kscope_common.grpc_server import write_port_file

__all__ = ["CONTENT_TYPE_LATEST", "MetricsServer", "counter", "gauge", "registry", "render"]


class _Collect(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]):
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


def registry(collect: Callable[[], Iterable[Metric]]) -> CollectorRegistry:
    """A registry with the process_* metrics and the families `collect` yields."""
    out = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=out)
    out.register(_Collect(collect))
    return out


def render(reg: CollectorRegistry) -> bytes:
    return generate_latest(reg)


def counter(
    name: str, doc: str, labels: tuple[str, ...], values: Mapping[tuple[str, ...], float]
) -> CounterMetricFamily:
    """`name` without _total (the family adds it)."""
    family = CounterMetricFamily(name, doc, labels=list(labels))
    for key, value in values.items():
        family.add_metric(list(key), value)
    return family


def gauge(
    name: str, doc: str, labels: tuple[str, ...], values: Mapping[tuple[str, ...], float]
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    for key, value in values.items():
        family.add_metric(list(key), value)
    return family


class MetricsServer:
    """/metrics over HTTP on its own thread (the controller and the agent serve gRPC)."""

    def __init__(self, reg: CollectorRegistry, host: str, port: int, port_file: Path | None):
        server: WSGIServer
        server, self._thread = start_http_server(port, host, reg)
        self._server = server
        self.port = int(server.server_port)
        write_port_file(port_file, self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def maybe_serve(
    collect: Callable[[], Iterable[Metric]], host: str, port: int | None, port_file: Path | None
) -> MetricsServer | None:
    """Serve /metrics when a port is configured (0 picks a free one)."""
    if port is None:
        return None
    return MetricsServer(registry(collect), host, port, port_file)
