"""`kscope usage` (who used what), `kscope keys update` and `kscope keys limits`
(per-key and per-owner limits and priorities). Tables for people, `--json`
for scripts; credentials as for the other commands (a user key sees and reads
only its own owner's)."""

from __future__ import annotations

import json
import os
import time
from enum import StrEnum
from typing import Annotated

import typer
from google.protobuf.timestamp_pb2 import Timestamp

from kscope.v1 import keys_pb2, usage_pb2, usage_pb2_grpc
from kscope_cli.operate import parse_duration
from kscope_cli.ops import (
    DEFAULT_CONTROLLER,
    AsJson,
    Ca,
    Controller,
    DailyTokens,
    Endpoint,
    Key,
    MaxConcurrent,
    Plaintext,
    Rpm,
    Tpm,
    _json,
    _key_rows,
    _keys_rpc,
    _rpc,
    _table,
    limits_message,
    limits_text,
)

KEY_ID_PREFIX = "key_"
"""Key ids start so; secrets start with "ks-"."""


class By(StrEnum):
    owner = "owner"
    key = "key"
    model = "model"
    day = "day"


_GROUPINGS = {
    By.owner: usage_pb2.USAGE_GROUPING_OWNER,
    By.key: usage_pb2.USAGE_GROUPING_KEY,
    By.model: usage_pb2.USAGE_GROUPING_MODEL,
    By.day: usage_pb2.USAGE_GROUPING_DAY,
}


def usage(
    owner: Annotated[str, typer.Option(help="only this owner (admins; users see their own)")] = "",
    key_id: Annotated[str, typer.Option("--key-id", help="only this key (key_…)")] = "",
    model: Annotated[str, typer.Option(help="only this model")] = "",
    since: Annotated[str, typer.Option(help="how far back: 90m, 24h, 7d …")] = "7d",
    by: Annotated[By, typer.Option(help="totals per owner, key, model or day")] = By.owner,
    controller: Controller = DEFAULT_CONTROLLER,
    key: Annotated[
        str,
        typer.Option(
            "--key",
            envvar="KSCOPE_API_KEY",
            show_default=False,
            help="a key id (key_…) to show only that key, as --key-id; or your API key (ks-…)",
        ),
    ] = "",
    ca: Ca = "",
    plaintext: Plaintext = False,
    as_json: AsJson = False,
) -> None:
    """Requests and tokens per owner, key, model or day (UTC hours, from the controller)."""
    if key.startswith(KEY_ID_PREFIX):
        # `--key key_…` names the key to report on (the spelling); the
        # caller's credential then comes from KSCOPE_API_KEY.
        key_id, key = key_id or key, os.environ.get("KSCOPE_API_KEY", "")
    start = Timestamp()
    start.FromSeconds(int(time.time() - parse_duration(since)))
    request = usage_pb2.QueryUsageRequest(
        owner=owner, key_id=key_id, model=model, since=start, by=_GROUPINGS[by]
    )
    reply: usage_pb2.QueryUsageResponse = _rpc(
        Endpoint(controller, ca, plaintext), key, usage_pb2_grpc.UsageServiceStub, "QueryUsage",
        request,
    )  # fmt: skip
    if as_json:
        rows = [_row_json(r, by) for r in reply.rows]
        typer.echo(json.dumps({"since": reply.since.ToSeconds(), "by": by.value, "rows": rows}))
        return
    headers = [by.value.upper(), *(["OWNER"] if by is By.key else [])]
    _table(
        [*headers, "REQUESTS", "ERRORS", "PROMPT", "COMPLETION", "TOTAL", "SECONDS"],
        [
            (r.group, *([r.owner] if by is By.key else []), r.requests, r.errors,
             r.prompt_tokens, r.completion_tokens, r.prompt_tokens + r.completion_tokens,
             f"{r.duration_seconds:.1f}")
            for r in reply.rows
        ],
    )  # fmt: skip


def _row_json(row: usage_pb2.UsageRow, by: By) -> dict[str, object]:
    """One total for scripts: numbers as numbers, the group under its own name."""
    out: dict[str, object] = {by.value: row.group}
    if by is By.key:
        out["owner"] = row.owner
    out.update(
        requests=row.requests, errors=row.errors, prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens,
        total_tokens=row.prompt_tokens + row.completion_tokens,
        duration_seconds=round(row.duration_seconds, 3),
    )  # fmt: skip
    return out


def keys_update(
    key_id: Annotated[str, typer.Argument(help="the key's id (key_…)")],
    rpm: Annotated[int | None, typer.Option("--rpm", min=0, help="requests per minute")] = None,
    tpm: Annotated[int | None, typer.Option("--tpm", min=0, help="tokens per minute")] = None,
    max_concurrent: Annotated[
        int | None, typer.Option("--max-concurrent", min=0, help="requests at once")
    ] = None,
    daily_tokens: Annotated[
        int | None, typer.Option("--daily-tokens", min=0, help="tokens per UTC day")
    ] = None,
    priority: Annotated[
        int | None, typer.Option(min=0, max=100, help="served first when contended")
    ] = None,
    controller: Controller = DEFAULT_CONTROLLER,
    key: Key = "",
    ca: Ca = "",
    plaintext: Plaintext = False,
    as_json: AsJson = False,
) -> None:
    """Change a key's limits (0: no limit; options not given stay) or priority (admins)."""
    endpoint = Endpoint(controller, ca, plaintext)
    request = keys_pb2.UpdateKeyRequest(key_id=key_id)
    given = (rpm, tpm, max_concurrent, daily_tokens)
    if any(v is not None for v in given):
        current = _current_limits(endpoint, key, key_id)
        request.limits.CopyFrom(
            limits_message(
                *(
                    value if value is not None else old
                    for value, old in zip(given, current, strict=True)
                )
            )
        )
    if priority is not None:
        request.priority = priority
    if not request.HasField("limits") and priority is None:
        raise typer.BadParameter("give a limit (--rpm, --tpm, --max-concurrent, "
                                 "--daily-tokens) or --priority")  # fmt: skip
    reply: keys_pb2.UpdateKeyResponse = _keys_rpc(endpoint, key, "UpdateKey", request)
    if as_json:
        _json(reply.key)
    else:
        _key_rows([reply.key])


def _current_limits(endpoint: Endpoint, key: str, key_id: str) -> tuple[int, int, int, int]:
    reply: keys_pb2.ListKeysResponse = _keys_rpc(
        endpoint, key, "ListKeys", keys_pb2.ListKeysRequest(include_revoked=True)
    )
    for k in reply.keys:
        if k.id == key_id:
            lim = k.limits
            return (lim.requests_per_minute, lim.tokens_per_minute, lim.max_concurrent,
                    lim.daily_tokens)  # fmt: skip
    typer.echo(f"kscope: NOT_FOUND: no key {key_id!r}", err=True)
    raise typer.Exit(1)


def keys_limits(
    owner: Annotated[
        str, typer.Option(help="set this owner's shared limits (all its keys together)")
    ] = "",
    rpm: Rpm = 0,
    tpm: Tpm = 0,
    max_concurrent: MaxConcurrent = 0,
    daily_tokens: DailyTokens = 0,
    controller: Controller = DEFAULT_CONTROLLER,
    key: Key = "",
    ca: Ca = "",
    plaintext: Plaintext = False,
    as_json: AsJson = False,
) -> None:
    """List owners' shared limits, or with --owner set them (all zero: none)."""
    endpoint = Endpoint(controller, ca, plaintext)
    if owner:
        request = keys_pb2.SetOwnerLimitsRequest(
            owner=owner, limits=limits_message(rpm, tpm, max_concurrent, daily_tokens)
        )
        set_reply: keys_pb2.SetOwnerLimitsResponse = _keys_rpc(
            endpoint, key, "SetOwnerLimits", request
        )
        owners = [set_reply.owner_limits]
    else:
        list_reply: keys_pb2.ListOwnerLimitsResponse = _keys_rpc(
            endpoint, key, "ListOwnerLimits", keys_pb2.ListOwnerLimitsRequest()
        )
        owners = list(list_reply.owners)
    if as_json:
        _json(owners)
    else:
        _table(["OWNER", "LIMITS"], [(o.owner, limits_text(o.limits)) for o in owners])


def register(app: typer.Typer, keys_app: typer.Typer) -> None:
    app.command()(usage)
    keys_app.command("update")(keys_update)
    keys_app.command("limits")(keys_limits)
