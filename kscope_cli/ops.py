"""Operator commands over gRPC: keys, models, instances, agents, facades and
hosts; and local portal users.

Tables for people, `--json` for scripts. `--controller` (KSCOPE_CONTROLLER)
names the controller's public port; `--key` (KSCOPE_API_KEY) is the caller's
API key (an admin key for everything but one's own keys); `--ca`
(KSCOPE_TLS_CA) the cluster CA the controller's certificate is checked
against (default: the CA a controller on this machine made, if any).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import grpc
import typer
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from kscope.v1 import (
    control_pb2,
    control_pb2_grpc,
    identity_pb2_grpc,
    keys_pb2,
    keys_pb2_grpc,
)
from kscope_common.pki import CONTROLLER_DNS_NAME

T = TypeVar("T")

Controller = Annotated[
    str,
    typer.Option("--controller", envvar="KSCOPE_CONTROLLER", help="controller host:port"),
]
Key = Annotated[
    str,
    typer.Option(
        "--key", envvar="KSCOPE_API_KEY", help="your API key (admins: an admin key)",
        show_default=False,
    ),
]  # fmt: skip
AsJson = Annotated[bool, typer.Option("--json", help="machine-readable output")]
Ca = Annotated[
    str,
    typer.Option(
        "--ca",
        envvar="KSCOPE_TLS_CA",
        show_default=False,
        help="the cluster CA certificate (PEM file; `kscope ca` prints it) "
        "[default: ~/.kscope/tls/ca.pem or ~/.kscope/serve/tls/ca.pem]",
    ),
]
Plaintext = Annotated[
    bool,
    typer.Option(
        "--insecure-plaintext", envvar="KSCOPE_INSECURE_PLAINTEXT",
        help="debugging only: the controller runs without TLS",
    ),
]  # fmt: skip
DEFAULT_CA_FILES = (Path("~/.kscope/tls/ca.pem"), Path("~/.kscope/serve/tls/ca.pem"))
DEFAULT_CONTROLLER = "127.0.0.1:50051"
_TIMEOUT_S = 10.0

keys_app = typer.Typer(no_args_is_help=True, help="Create, list and revoke API keys.")
users_app = typer.Typer(no_args_is_help=True, help="Local portal users (when no LDAP).")


class Role(StrEnum):
    user = "user"
    admin = "admin"


@dataclass(frozen=True)
class Endpoint:
    """Where the controller is and how to trust it."""

    controller: str
    ca: str = ""
    plaintext: bool = False

    def channel(self) -> grpc.Channel:
        if self.plaintext:
            return grpc.insecure_channel(self.controller)
        credentials = grpc.ssl_channel_credentials(_ca_pem(self.ca))
        # Every controller certificate names controller.kscope: any address works.
        return grpc.secure_channel(
            self.controller, credentials, [("grpc.ssl_target_name_override", CONTROLLER_DNS_NAME)]
        )


def _ca_pem(ca: str) -> bytes:
    candidates = [Path(ca)] if ca else [p.expanduser() for p in DEFAULT_CA_FILES]
    for path in candidates:
        if path.is_file():
            return path.read_bytes()
    where = ca or " or ".join(str(p) for p in DEFAULT_CA_FILES)
    typer.echo(
        f"kscope: no CA certificate at {where}: pass --ca (or KSCOPE_TLS_CA) with the file "
        "`kscope ca` prints on the controller's machine",
        err=True,
    )
    raise typer.Exit(2)


def _call(endpoint: Endpoint, key: str, fn: Callable[[grpc.Channel, Any], T]) -> T:
    """Run one RPC; a gRPC failure becomes a one-line message and exit status 1."""
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    try:
        with endpoint.channel() as channel:
            return fn(channel, metadata)
    except grpc.RpcError as exc:
        code = exc.code().name if hasattr(exc, "code") else "ERROR"
        details = exc.details() if hasattr(exc, "details") else str(exc)
        typer.echo(f"kscope: {code}: {details}", err=True)
        raise typer.Exit(1) from exc


def _rpc(endpoint: Endpoint, key: str, stub: Callable[[grpc.Channel], Any], method: str,
         request: Message) -> Any:  # fmt: skip
    return _call(
        endpoint,
        key,
        lambda ch, md: getattr(stub(ch), method)(request, metadata=md, timeout=_TIMEOUT_S),
    )


def _keys_rpc(endpoint: Endpoint, key: str, method: str, request: Message) -> Any:
    return _rpc(endpoint, key, keys_pb2_grpc.KeyServiceStub, method, request)


def _control_rpc(endpoint: Endpoint, key: str, method: str, request: Message) -> Any:
    return _rpc(endpoint, key, control_pb2_grpc.ControlServiceStub, method, request)


def _identity_rpc(endpoint: Endpoint, key: str, method: str, request: Message) -> Any:
    return _rpc(endpoint, key, identity_pb2_grpc.IdentityServiceStub, method, request)


def _when(ts: Any) -> str:
    seconds = ts.ToNanoseconds() / 1e9
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(seconds)) if seconds else "-"


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    for row in [list(headers), *cells]:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _json(messages: Sequence[Message] | Message) -> None:
    if isinstance(messages, Message):
        data: Any = MessageToDict(messages, preserving_proto_field_name=True)
    else:
        data = [MessageToDict(m, preserving_proto_field_name=True) for m in messages]
    typer.echo(json.dumps(data, indent=2))


def _role_name(role: int) -> str:
    return "admin" if role == keys_pb2.KEY_ROLE_ADMIN else "user"


def limits_text(limits: keys_pb2.Limits) -> str:
    """ "rpm=5 tpm=1000 …" for the limits set; "-" for none."""
    parts = [
        f"{name}={value}"
        for name, value in (
            ("rpm", limits.requests_per_minute), ("tpm", limits.tokens_per_minute),
            ("concurrent", limits.max_concurrent), ("daily", limits.daily_tokens),
        )
        if value
    ]  # fmt: skip
    return " ".join(parts) or "-"


def _key_rows(keys: Sequence[keys_pb2.ApiKey]) -> None:
    _table(
        ["ID", "OWNER", "NAME", "ROLE", "KEY", "MODELS", "LIMITS", "PRIORITY", "CREATED",
         "EXPIRES", "STATUS"],
        [
            (k.id, k.owner, k.name, _role_name(k.role), f"{k.prefix}…", ",".join(k.models) or "*",
             limits_text(k.limits), k.priority, _when(k.created_at), _when(k.expires_at),
             "revoked" if k.revoked else "active")
            for k in keys
        ],
    )  # fmt: skip


Rpm = Annotated[int, typer.Option("--rpm", min=0, help="requests per minute (0: no limit)")]
Tpm = Annotated[int, typer.Option("--tpm", min=0, help="tokens per minute (0: no limit)")]
MaxConcurrent = Annotated[
    int, typer.Option("--max-concurrent", min=0, help="requests at once (0: no limit)")
]
DailyTokens = Annotated[
    int, typer.Option("--daily-tokens", min=0, help="tokens per UTC day (0: no limit)")
]


def limits_message(rpm: int, tpm: int, max_concurrent: int, daily_tokens: int) -> keys_pb2.Limits:
    return keys_pb2.Limits(
        requests_per_minute=rpm, tokens_per_minute=tpm, max_concurrent=max_concurrent,
        daily_tokens=daily_tokens,
    )  # fmt: skip


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="what the key is for")],
    owner: Annotated[str, typer.Option(help="whose key (admins); default: yours")] = "",
    days: Annotated[
        int, typer.Option(help="lifetime in days; 0: the controller's default", min=0)
    ] = 0,
    model: Annotated[
        list[str] | None, typer.Option(help="a model name or pattern it may use (repeat)")
    ] = None,
    role: Annotated[Role, typer.Option(help="user or admin")] = Role.user,
    rpm: Rpm = 0,
    tpm: Tpm = 0,
    max_concurrent: MaxConcurrent = 0,
    daily_tokens: DailyTokens = 0,
    priority: Annotated[
        int, typer.Option(min=0, max=100, help="served first when contended (admins)")
    ] = 0,
    controller: Controller = DEFAULT_CONTROLLER,
    key: Key = "",
    ca: Ca = "",
    plaintext: Plaintext = False,
    as_json: AsJson = False,
) -> None:
    """Create a key and print its secret (shown this once)."""
    request = keys_pb2.CreateKeyRequest(
        owner=owner, name=name, expires_in_seconds=days * 86400, models=model or [],
        role=keys_pb2.KEY_ROLE_ADMIN if role is Role.admin else keys_pb2.KEY_ROLE_USER,
        limits=limits_message(rpm, tpm, max_concurrent, daily_tokens), priority=priority,
    )  # fmt: skip
    reply: keys_pb2.CreateKeyResponse = _keys_rpc(
        Endpoint(controller, ca, plaintext), key, "CreateKey", request
    )
    if as_json:
        _json(reply)
        return
    _key_rows([reply.key])
    typer.echo(f"\nsecret (shown only now): {reply.secret}")


@keys_app.command("list")
def keys_list(
    owner: Annotated[str, typer.Option(help="only this owner's keys (admins)")] = "",
    all_keys: Annotated[bool, typer.Option("--all", help="include revoked keys")] = False,
    controller: Controller = DEFAULT_CONTROLLER,
    key: Key = "",
    ca: Ca = "",
    plaintext: Plaintext = False,
    as_json: AsJson = False,
) -> None:
    """List keys (never their secrets)."""
    request = keys_pb2.ListKeysRequest(owner=owner, include_revoked=all_keys)
    reply: keys_pb2.ListKeysResponse = _keys_rpc(
        Endpoint(controller, ca, plaintext), key, "ListKeys", request
    )
    if as_json:
        _json(list(reply.keys))
    else:
        _key_rows(list(reply.keys))


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="the key's id (key_…)")],
    controller: Controller = DEFAULT_CONTROLLER,
    key: Key = "",
    ca: Ca = "",
    plaintext: Plaintext = False,
    as_json: AsJson = False,
) -> None:
    """Revoke a key; every facade refuses it within a second."""
    request = keys_pb2.RevokeKeyRequest(key_id=key_id)
    reply: keys_pb2.RevokeKeyResponse = _keys_rpc(
        Endpoint(controller, ca, plaintext), key, "RevokeKey", request
    )
    if as_json:
        _json(reply.key)
    else:
        typer.echo(f"revoked {reply.key.id} ({reply.key.owner}/{reply.key.name})")


_MODEL_STATES = {1: "cold", 2: "starting", 3: "ready"}


def models(
    controller: Controller = DEFAULT_CONTROLLER,
    key: Key = "",
    ca: Ca = "",
    plaintext: Plaintext = False,
    as_json: AsJson = False,
) -> None:
    """The catalog with each model's live state (an admin key)."""
    reply: control_pb2.ListModelsResponse = _control_rpc(
        Endpoint(controller, ca, plaintext), key, "ListModels", control_pb2.ListModelsRequest()
    )
    if as_json:
        _json(list(reply.models))
        return
    _table(
        ["MODEL", "STATE", "READY", "LIVE", "ENGINE", "LAUNCHER", "MESSAGE"],
        [
            (m.name, _MODEL_STATES.get(m.state, "?"), m.ready_replicas, m.live_replicas,
             m.engine, m.launcher, m.state_message)
            for m in reply.models
        ],
    )  # fmt: skip


def instances(
    model: Annotated[str, typer.Option(help="only this model's instances")] = "",
    ended: Annotated[bool, typer.Option("--all", help="include stopped and failed")] = False,
    controller: Controller = DEFAULT_CONTROLLER,
    key: Key = "",
    ca: Ca = "",
    plaintext: Plaintext = False,
    as_json: AsJson = False,
) -> None:
    """Instances, newest first (an admin key)."""
    request = control_pb2.ListInstancesRequest(model=model, include_ended=ended)
    reply: control_pb2.ListInstancesResponse = _control_rpc(
        Endpoint(controller, ca, plaintext), key, "ListInstances", request
    )
    if as_json:
        _json(list(reply.instances))
        return
    _table(
        ["ID", "MODEL", "STATE", "LAUNCHER", "REF", "AGENT", "IN-FLIGHT", "CREATED", "REASON"],
        [
            (i.id, i.model, control_pb2.InstanceState.Name(i.state).removeprefix("INSTANCE_STATE_"),
             i.launcher, i.launcher_ref, i.agent_address or "-", i.in_flight,
             _when(i.created_at), i.reason)
            for i in reply.instances
        ],
    )  # fmt: skip


def agents(
    controller: Controller = DEFAULT_CONTROLLER,
    key: Key = "",
    ca: Ca = "",
    plaintext: Plaintext = False,
    as_json: AsJson = False,
) -> None:
    """Agents connected now (an admin key)."""
    reply: control_pb2.ListAgentsResponse = _control_rpc(
        Endpoint(controller, ca, plaintext), key, "ListAgents", control_pb2.ListAgentsRequest()
    )
    if as_json:
        _json(list(reply.agents))
        return
    _table(
        ["ID", "INSTANCE", "ADDRESS", "HOST", "MODELS", "ENGINE", "PID", "LAST REPORT"],
        [
            (a.id, a.instance_id, a.address, a.hostname, ",".join(a.models), a.engine, a.pid,
             _when(a.last_report_at))
            for a in reply.agents
        ],
    )  # fmt: skip


@users_app.command("add")
def users_add(
    username: Annotated[str, typer.Argument(help="the login name")],
    users_file: Annotated[
        Path, typer.Option("--file", envvar="KSCOPE_PORTAL_USERS_FILE", help="users file")
    ] = Path("~/.kscope/users.toml"),
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="read the password from stdin")
    ] = False,
) -> None:
    """Add (or reset) a local portal user; the password is stored as a salted scrypt hash."""
    from facade.portal.local_users import UsersFileError, add_user

    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = typer.prompt("password", hide_input=True, confirmation_prompt=True)
    if len(password) < 8:
        raise typer.BadParameter("use at least 8 characters")
    try:
        add_user(users_file, username, password)
    except UsersFileError as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(f"user {username} saved in {users_file}")


def register(app: typer.Typer) -> None:
    """Add the operator commands to the `kscope` app."""
    app.add_typer(keys_app, name="keys")
    app.add_typer(users_app, name="users")
    from kscope_cli.identities import register as register_identity_commands
    from kscope_cli.operate import register as register_operate_commands
    from kscope_cli.usage import register as register_usage_commands

    register_identity_commands(app)
    register_operate_commands(app)
    register_usage_commands(app, keys_app)
    app.command()(models)
    app.command()(instances)
    app.command()(agents)
