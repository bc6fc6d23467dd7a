"""The facade's /metrics: the proxy's plain counters and the route table, read
only when scraped (the token path never touches prometheus_client)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client.core import Metric

from facade import response as response_module
from facade.proxy import InferenceProxy
from facade.routing import RouteTable
from kscope_common.metrics import counter, gauge


def facade_metrics(
    table: RouteTable, get_proxy: Callable[[], InferenceProxy | None]
) -> Iterable[Metric]:
    proxy = get_proxy()
    models = dict(table.models)
    if proxy is not None:
        yield from proxy.stats.families(
            "kscope_facade",
            "measured by the facade, from a request's arrival to its answer's last byte"
            ' (a request for no catalog model has model="")',
            tokens=False,
        )
    by_owner = dict(proxy.usage.by_owner) if proxy else {}
    yield counter(
        "kscope_facade_owner_requests",
        "Inference requests by the key's owner and model (owner, not key: one series per"
        ' person, docs/usage.md); model="" for no catalog model.',
        ("owner", "model"),
        {k: v[0] for k, v in by_owner.items()},
    )
    yield counter(
        "kscope_facade_owner_tokens",
        "Tokens the engine counted, by the key's owner, model and kind (prompt, completion).",
        ("owner", "model", "kind"),
        {
            **{(o, m, "prompt"): v[1] for (o, m), v in by_owner.items()},
            **{(o, m, "completion"): v[2] for (o, m), v in by_owner.items()},
        },
    )
    yield counter(
        "kscope_facade_stream_chunks",
        "SSE events forwarded to clients.",
        (),
        {(): proxy.stream_chunks if proxy else 0},
    )
    yield counter(
        "kscope_facade_error_responses",
        "Error answers sent, by HTTP status.",
        ("status",),
        {(str(s),): n for s, n in dict(response_module.ERRORS).items()},
    )
    yield counter(
        "kscope_facade_cold_waits",
        "Requests that waited for a cold model (X-KScope-Wait), by outcome.",
        ("model", "outcome"),
        dict(proxy.cold_waits) if proxy else {},
    )
    yield gauge(
        "kscope_facade_waiting_requests",
        "Requests waiting for a cold model now.",
        ("model",),
        {(m,): n for m, n in (proxy.waiting() if proxy else {}).items()},
    )
    yield gauge(
        "kscope_facade_ready_instances",
        "READY instances in the route table.",
        ("model",),
        {(m,): len(e.targets) for m, e in models.items()},
    )
    yield gauge(
        "kscope_facade_outstanding_requests",
        "Requests this facade has outstanding on each model's instances.",
        ("model",),
        {(m,): sum(t.outstanding for t in e.targets) for m, e in models.items()},
    )
