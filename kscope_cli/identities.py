"""`kscope ca`, `kscope facades add|list|revoke`, `kscope hosts add|list|revoke`:
the cluster CA certificate, and the enrollments of facades and Mac host agents
(an admin key, or an operator certificate)."""

from pathlib import Path
from typing import Annotated

import typer

from kscope.v1 import identity_pb2
from kscope_cli.ops import (
    DEFAULT_CONTROLLER,
    AsJson,
    Ca,
    Controller,
    Endpoint,
    Key,
    Plaintext,
    _identity_rpc,
    _json,
    _table,
    _when,
)

_KINDS = {
    "facade": identity_pb2.ENROLLMENT_KIND_FACADE,
    "host": identity_pb2.ENROLLMENT_KIND_HOST,
    "operator": identity_pb2.ENROLLMENT_KIND_OPERATOR,
}
_KIND_NAMES = {v: k for k, v in _KINDS.items()} | {
    identity_pb2.ENROLLMENT_KIND_INSTANCE: "instance"
}


def ca(
    state_dir: Annotated[
        Path | None,
        typer.Option(
            help="the controller's state directory [default: ~/.kscope, then ~/.kscope/serve]"
        ),
    ] = None,
) -> None:
    """Print the cluster CA certificate (public): what agents, facades, the CLI
    and grpcurl (`-cacert`) check the controller against."""
    dirs = [state_dir] if state_dir else [Path("~/.kscope"), Path("~/.kscope/serve")]
    for folder in dirs:
        path = folder.expanduser() / "tls" / "ca.pem"
        if path.is_file():
            typer.echo(path.read_text(), nl=False)
            return
    typer.echo(
        f"kscope: no CA in {' or '.join(str(d) for d in dirs)} (tls/ca.pem): run this where "
        "the controller runs, or pass --state-dir",
        err=True,
    )
    raise typer.Exit(2)


def _enrollment_rows(enrollments: list[identity_pb2.Enrollment]) -> None:
    _table(
        ["ID", "KIND", "NAME", "IDENTITY", "CREATED", "EXPIRES", "USES", "STATUS"],
        [
            (e.id, _KIND_NAMES.get(e.kind, "?"), e.name, e.identity, _when(e.created_at),
             _when(e.expires_at), e.uses, "revoked" if e.revoked else "active")
            for e in enrollments
        ],
    )  # fmt: skip


def _enrollment_app(kind: str, what: str, started_by: str) -> typer.Typer:
    app = typer.Typer(no_args_is_help=True, help=f"Enroll and revoke {what}.")

    @app.command("add")
    def add(
        name: Annotated[str, typer.Argument(help=f"the {kind}'s name")],
        days: Annotated[
            float, typer.Option(help="the token's lifetime; 0: until revoked", min=0)
        ] = 0,
        controller: Controller = DEFAULT_CONTROLLER,
        key: Key = "",
        ca: Ca = "",
        plaintext: Plaintext = False,
        as_json: AsJson = False,
    ) -> None:
        request = identity_pb2.CreateEnrollmentRequest(
            kind=_KINDS[kind],
            name=name,
            expires_in_seconds=int(days * 86400),
        )
        reply: identity_pb2.CreateEnrollmentResponse = _identity_rpc(
            Endpoint(controller, ca, plaintext), key, "CreateEnrollment", request
        )
        if as_json:
            _json(reply)
            return
        _enrollment_rows([reply.enrollment])
        typer.echo(f"\nenrollment token (shown only now): {reply.token}")
        typer.echo(f"give it to the {kind} in KSCOPE_ENROLL_TOKEN, {started_by}")

    add.__doc__ = f"Make an enrollment token for a {kind} (reusable until revoked)."

    @app.command("list")
    def list_(
        all_enrollments: Annotated[
            bool, typer.Option("--all", help="include revoked ones")
        ] = False,
        controller: Controller = DEFAULT_CONTROLLER,
        key: Key = "",
        ca: Ca = "",
        plaintext: Plaintext = False,
        as_json: AsJson = False,
    ) -> None:
        reply: identity_pb2.ListEnrollmentsResponse = _identity_rpc(
            Endpoint(controller, ca, plaintext), key, "ListEnrollments",
            identity_pb2.ListEnrollmentsRequest(include_revoked=all_enrollments),
        )  # fmt: skip
        mine = [e for e in reply.enrollments if e.kind == _KINDS[kind]]
        if as_json:
            _json(mine)
        else:
            _enrollment_rows(mine)

    list_.__doc__ = f"List {what}."

    @app.command("revoke")
    def revoke(
        name: Annotated[str, typer.Argument(help=f"the {kind}'s name")],
        controller: Controller = DEFAULT_CONTROLLER,
        key: Key = "",
        ca: Ca = "",
        plaintext: Plaintext = False,
        as_json: AsJson = False,
    ) -> None:
        reply: identity_pb2.RevokeEnrollmentResponse = _identity_rpc(
            Endpoint(controller, ca, plaintext), key, "RevokeEnrollment",
            identity_pb2.RevokeEnrollmentRequest(kind=_KINDS[kind], name=name),
        )  # fmt: skip
        if as_json:
            _json(list(reply.enrollments))
        else:
            typer.echo(
                f"revoked {kind} {name}: its certificates are refused and its streams closed"
            )

    revoke.__doc__ = (
        f"Revoke a {kind}: refused at its next call, its streams closed within a second."
    )
    return app


def register(app: typer.Typer) -> None:
    app.command()(ca)
    app.add_typer(
        _enrollment_app("facade", "facades", "KSCOPE_TLS_CA to the CA (`kscope ca`)"),
        name="facades",
    )
    app.add_typer(
        _enrollment_app(
            "host", "Mac host agents",
            "or give it to `kscope-agent install-launchd --ca ca.pem` in KSCOPE_ENROLL_TOKEN",
        ),
        name="hosts",
    )  # fmt: skip
    app.add_typer(
        _enrollment_app(
            "operator",
            "operator certificates",
            "or trade it for a certificate with IdentityService.Enroll (docs/security.md)",
        ),
        name="operators",
    )
