"""The agents running in this process (`kscope serve`'s, node_agent/in_process.py),
by instance id: the facade of the same process calls their request life
directly instead of over gRPC."""

from __future__ import annotations

from dataclasses import dataclass

from node_agent.request_life import AgentCore


@dataclass(frozen=True)
class Published:
    address: str
    core: AgentCore


_PUBLISHED: dict[str, Published] = {}
"""The request life of every agent running in this process, by instance id."""


def publish(instance_id: str, address: str, core: AgentCore) -> None:
    _PUBLISHED[instance_id] = Published(address, core)


def withdraw(instance_id: str, core: AgentCore) -> None:
    published = _PUBLISHED.get(instance_id)
    if published is not None and published.core is core:
        del _PUBLISHED[instance_id]


def local_agent(instance_id: str, address: str) -> AgentCore | None:
    """The request life of the agent of `instance_id` at `address`, when it runs
    in this process; None otherwise (it is reached over gRPC)."""
    published = _PUBLISHED.get(instance_id)
    if published is None or published.address != address:
        return None
    return published.core
