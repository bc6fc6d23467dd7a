"""A host agent's /metrics: one scrape target per machine. It lists the
instances the host runs, and passes on each running instance agent's own
/metrics (served on a port of the instance's choosing, which it writes to a
file the host reads) with an `instance_id` label added."""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

log = logging.getLogger(__name__)

FETCH_TIMEOUT_S = 2.0
_HOSTS_OWN = ("process_", "python_")
"""Families the host's registry has itself: an instance's would clash."""


def scrape_instance(port_file: Path, host: str, instance_id: str) -> list[Metric]:
    """An instance agent's families with `instance_id` added; [] when it does not
    answer (it may be starting or gone: the scrape goes on without it)."""
    try:
        port = int(port_file.read_text().strip())
        url = f"http://{_reachable(host)}:{port}/metrics"
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as reply:
            text = reply.read().decode()
    except (OSError, ValueError) as exc:
        log.debug("no /metrics from instance %s: %s", instance_id, exc)
        return []
    out: list[Metric] = []
    for family in text_string_to_metric_families(text):
        if family.name.startswith(_HOSTS_OWN):
            continue
        labelled = Metric(family.name, family.documentation, family.type, family.unit)
        labelled.samples = [
            Sample(s.name, {**s.labels, "instance_id": instance_id}, s.value, s.timestamp)
            for s in family.samples
        ]
        out.append(labelled)
    return out


def merge(families: Iterable[Metric]) -> list[Metric]:
    """One family per name, holding every instance's samples."""
    by_name: dict[str, Metric] = {}
    for family in families:
        seen = by_name.get(family.name)
        if seen is None:
            by_name[family.name] = family
        else:
            seen.samples.extend(family.samples)
    return list(by_name.values())


def _reachable(host: str) -> str:
    """Where to reach a server bound to `host` from the same machine."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host
