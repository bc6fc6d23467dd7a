"""Operator commands for what was grpcurl-only: stop or drain an instance, a
model's replica bounds, the scaler's decisions, a model's telemetry, and one
status screen. Tables for
people, `--json` for scripts; an admin key (or operator certificate) as for the
other commands."""

from __future__ import annotations

import json
import re
import time
from typing import Annotated

import typer
from google.protobuf.json_format import MessageToDict

from kscope.v1 import control_pb2
from kscope_cli.ops import (
    _MODEL_STATES,
    DEFAULT_CONTROLLER,
    AsJson,
    Ca,
    Controller,
    Endpoint,
    Key,
    Plaintext,
    _control_rpc,
    _json,
    _table,
)

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """'90', '90s', '15m', '2h', '7d' → seconds; BadParameter otherwise."""
    found = _DURATION.match(text.strip())
    if found is None:
        raise typer.BadParameter(f"{text!r}: use a number with s, m, h or d (e.g. 15m)")
    return float(found.group(1)) * _UNIT_S[found.group(2)]


def _clock(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds)) if seconds else "-"


def _stop(instance: str, controller: str, key: str, ca: str, plaintext: bool, as_json: bool,
          verb: str) -> None:  # fmt: skip
    reply: control_pb2.StopInstanceResponse = _control_rpc(
        Endpoint(controller, ca, plaintext), key, "StopInstance",
        control_pb2.StopInstanceRequest(instance_id=instance),
    )  # fmt: skip
    if as_json:
        _json(reply.instance)
        return
    state = control_pb2.InstanceState.Name(reply.instance.state).removeprefix("INSTANCE_STATE_")
    typer.echo(f"{verb} {reply.instance.id} ({reply.instance.model}): now {state}; its agent "
               "finishes the requests in flight, then the instance stops")  # fmt: skip


def stop(
    instance: Annotated[str, typer.Argument(help="the instance id (kscope instances)")],
    controller: Controller = DEFAULT_CONTROLLER,
    key: Key = "",
    ca: Ca = "",
    plaintext: Plaintext = False,
    as_json: AsJson = False,
) -> None:
    """Stop an instance: it drains (requests in flight finish), then its process
    or SLURM job ends. A model below min_replicas gets a replacement."""
    _stop(instance, controller, key, ca, plaintext, as_json, "stopping")


def drain(
    instance: Annotated[str, typer.Argument(help="the instance id (kscope instances)")],
    controller: Controller = DEFAULT_CONTROLLER,
    key: Key = "",
    ca: Ca = "",
    plaintext: Plaintext = False,
    as_json: AsJson = False,
) -> None:
    """Drain an instance: no new requests, those in flight finish, then it stops
    (the same graceful path as `kscope stop`)."""
    _stop(instance, controller, key, ca, plaintext, as_json, "draining")


def decisions(
    model: Annotated[str, typer.Option(help="only this model's decisions")] = "",
    limit: Annotated[int, typer.Option(help="the newest N", min=1)] = 50,
    controller: Controller = DEFAULT_CONTROLLER,
    key: Key = "",
    ca: Ca = "",
    plaintext: Plaintext = False,
    as_json: AsJson = False,
) -> None:
    """The scaler's recent decisions (launch, drain, stop) with their reasons, newest first."""
    reply: control_pb2.ListDecisionsResponse = _control_rpc(
        Endpoint(controller, ca, plaintext), key, "ListDecisions",
        control_pb2.ListDecisionsRequest(model=model),
    )  # fmt: skip
    shown = list(reply.decisions)[:limit]
    if as_json:
        _json(shown)
        return
    _table(
        ["TIME (UTC)", "ACTION", "MODEL", "INSTANCE", "REASON"],
        [(_clock(d.time_unix_seconds), d.action, d.model, d.instance_id or "-", d.reason)
         for d in shown],
    )  # fmt: skip


def telemetry(
    model: Annotated[str, typer.Argument(help="the model")],
    since: Annotated[str, typer.Option(help="how far back: 90s, 15m, 2h, 7d")] = "1h",
    instances: Annotated[bool, typer.Option("--instances", help="per instance too")] = False,
    controller: Controller = DEFAULT_CONTROLLER,
    key: Key = "",
    ca: Ca = "",
    plaintext: Plaintext = False,
    as_json: AsJson = False,
) -> None:
    """A model's telemetry samples (requests/s, tokens/s, latency, instances), oldest first."""
    after = time.time() - parse_duration(since)
    reply: control_pb2.GetTelemetryResponse = _control_rpc(
        Endpoint(controller, ca, plaintext), key, "GetTelemetry",
        control_pb2.GetTelemetryRequest(model=model, include_instances=instances),
    )  # fmt: skip
    records = [r for r in reply.records if r.time_unix_seconds >= after]
    if as_json:
        _json(records)
        return
    _table(
        ["TIME (UTC)", "INSTANCE", "STATE", "READY", "IN-FLIGHT", "QUEUED", "REQ/S", "TOK/S",
         "ERR/S", "TTFT S", "LATENCY S"],
        [(_clock(r.time_unix_seconds), r.instance_id or "(model)", r.state, r.ready_replicas,
          r.in_flight, r.queued, f"{r.requests_per_second:.2f}", f"{r.tokens_per_second:.1f}",
          f"{r.errors_per_second:.2f}", f"{r.ttft_seconds:.3f}", f"{r.latency_seconds:.3f}")
         for r in records],
    )  # fmt: skip


def status(
    controller: Controller = DEFAULT_CONTROLLER,
    key: Key = "",
    ca: Ca = "",
    plaintext: Plaintext = False,
    as_json: AsJson = False,
) -> None:
    """One screen: models, instances by state (SLURM jobs with their pending
    reasons), agents, and whether the controller answers."""
    endpoint = Endpoint(controller, ca, plaintext)
    started = time.monotonic()
    models: control_pb2.ListModelsResponse = _control_rpc(
        endpoint, key, "ListModels", control_pb2.ListModelsRequest()
    )
    answered_ms = (time.monotonic() - started) * 1000
    live: control_pb2.ListInstancesResponse = _control_rpc(
        endpoint, key, "ListInstances", control_pb2.ListInstancesRequest()
    )
    agents: control_pb2.ListAgentsResponse = _control_rpc(
        endpoint, key, "ListAgents", control_pb2.ListAgentsRequest()
    )
    if as_json:
        typer.echo(json.dumps({
            "controller": {"address": controller, "answered_ms": round(answered_ms, 1)},
            "models": [MessageToDict(m, preserving_proto_field_name=True) for m in models.models],
            "instances": [MessageToDict(i, preserving_proto_field_name=True)
                          for i in live.instances],
            "agents": [MessageToDict(a, preserving_proto_field_name=True) for a in agents.agents],
        }, indent=2))  # fmt: skip
        return
    typer.echo(f"controller {controller}: answering ({answered_ms:.0f} ms)\n")
    _table(
        ["MODEL", "STATE", "READY", "LIVE", "LAUNCHER", "MESSAGE"],
        [(m.name, _MODEL_STATES.get(m.state, "?"), m.ready_replicas, m.live_replicas,
          m.launcher, m.state_message) for m in models.models],
    )  # fmt: skip
    typer.echo("")
    by_state: dict[str, int] = {}
    for inst in live.instances:
        name = control_pb2.InstanceState.Name(inst.state).removeprefix("INSTANCE_STATE_")
        by_state[name] = by_state.get(name, 0) + 1
    typer.echo("instances: " + (", ".join(f"{n} {s}" for s, n in sorted(by_state.items()))
                                or "none"))  # fmt: skip
    jobs = [i for i in live.instances if i.launcher == "slurm"]
    if jobs:
        typer.echo("")
        _table(
            ["INSTANCE", "MODEL", "JOB", "STATE", "REASON"],
            [(i.id, i.model, i.launcher_ref or "-",
              control_pb2.InstanceState.Name(i.state).removeprefix("INSTANCE_STATE_"), i.reason)
             for i in jobs],
        )  # fmt: skip
    typer.echo(f"\nagents connected: {len(agents.agents)} "
               f"({sum(1 for a in agents.agents if a.host_agent)} host agents)")  # fmt: skip


def scale(
    model: Annotated[str, typer.Argument(help="the model")],
    min_replicas: Annotated[
        int | None, typer.Option("--min", help="instances kept even when idle", min=0)
    ] = None,
    max_replicas: Annotated[
        int | None, typer.Option("--max", help="instances load may add up to", min=1)
    ] = None,
    controller: Controller = DEFAULT_CONTROLLER,
    key: Key = "",
    ca: Ca = "",
    plaintext: Plaintext = False,
    as_json: AsJson = False,
) -> None:
    """Change a model's replica bounds. Kept in the controller's store like the
    catalog; a controller started with --catalog FILE takes the file's again."""
    if min_replicas is None and max_replicas is None:
        raise typer.BadParameter("give --min, --max or both")
    request = control_pb2.ScaleModelRequest(model=model)
    if min_replicas is not None:
        request.min_replicas = min_replicas
    if max_replicas is not None:
        request.max_replicas = max_replicas
    reply: control_pb2.ScaleModelResponse = _control_rpc(
        Endpoint(controller, ca, plaintext), key, "ScaleModel", request
    )
    if as_json:
        _json(reply)
        return
    now = reply.model
    typer.echo(f"{model}: {reply.min_replicas}..{reply.max_replicas} replicas "
               f"({now.ready_replicas} ready, {now.live_replicas} live now)")  # fmt: skip


def register(app: typer.Typer) -> None:
    for command in (stop, drain, scale, decisions, telemetry, status):
        app.command()(command)
