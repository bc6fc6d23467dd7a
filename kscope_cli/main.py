"""`kscope`: run KScope on one machine, and (later) operate a cluster's KScope."""

from __future__ import annotations

import ipaddress
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from controller.catalog import CatalogError
from kscope_cli.ops import register as register_operator_commands
from kscope_common.daemon import run
from kscope_common.logs import configure_logging

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)


@app.callback()
def root() -> None:
    """KScope: one OpenAI-compatible endpoint for every model a cluster runs."""


class Engine(StrEnum):
    vllm = "vllm"
    mlx_vlm = "mlx_vlm"
    openai = "openai"


@app.command()
def serve(
    engine: Annotated[
        Engine, typer.Option("--engine", "--model-type", help="vllm, mlx_vlm or openai")
    ] = Engine.vllm,
    model_path: Annotated[
        str | None, typer.Option(help="weights directory (vllm, mlx_vlm)")
    ] = None,
    upstream_url: Annotated[
        str | None, typer.Option(help="running OpenAI-compatible server, e.g. http://h:8000/v1")
    ] = None,
    model: Annotated[str, typer.Option(help="model name clients use")] = "",
    host: Annotated[str, typer.Option(help="HTTP address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port", envvar="PROXY_PORT")] = 8000,
    api_key: Annotated[
        str | None, typer.Option(help="the one key clients must send", envvar="KSCOPE_API_KEY")
    ] = None,
    engine_args: Annotated[str, typer.Option(help="extra engine flags, one string")] = "",
    max_concurrency: Annotated[
        int | None,
        typer.Option(
            help="requests the engine works on at once; 0: no limit "
            "[default: 1 for mlx_vlm, no limit otherwise]",
            min=0,
        ),
    ] = None,
    queue_size: Annotated[
        int | None, typer.Option(help="requests that may wait; more get 429 [default: 100]", min=0)
    ] = None,
    queue_timeout: Annotated[
        float | None,
        typer.Option(help="seconds a request may wait in the queue, then 504 [default: 300]"),
    ] = None,
    controller_port: Annotated[int, typer.Option(help="controller gRPC port (0: any)")] = 50051,
    state_dir: Annotated[Path, typer.Option(help="SQLite and logs")] = Path("~/.kscope/serve"),
    require_key: Annotated[
        bool | None,
        typer.Option(
            "--require-key/--no-require-key",
            help="every /v1 request needs a key (the printed admin key, or --api-key); "
            "default: on when --api-key is given or --host is not a loopback address, "
            "off otherwise, as with `vllm serve`",
        ),
    ] = None,
    insecure_plaintext: Annotated[
        bool,
        typer.Option(
            "--insecure-plaintext",
            envvar="KSCOPE_INSECURE_PLAINTEXT",
            help="debugging and benchmarks only: the gRPC plane without TLS",
        ),
    ] = False,
    in_process_agents: Annotated[
        bool,
        typer.Option(
            "--in-process-agents/--agent-processes",
            envvar="KSCOPE_IN_PROCESS_AGENTS",
            help="vllm and openai agents run in this process and the facade calls them "
            "directly (one hop fewer); --agent-processes: each agent is a process reached "
            "over gRPC, as on a cluster (mlx_vlm agents always are)",
        ),
    ] = True,
) -> None:
    """Run controller, facade and one agent for one model, on this machine."""
    from kscope_cli.serve import QueueOptions, build_catalog
    from kscope_cli.serve import serve as run_serve

    configure_logging("kscope")
    if engine is Engine.openai and not upstream_url:
        raise typer.BadParameter("--engine openai needs --upstream-url")
    if engine is not Engine.openai and not model_path:
        raise typer.BadParameter(f"--engine {engine.value} needs --model-path")
    try:
        catalog = build_catalog(
            engine.value, model, model_path, upstream_url, engine_args,
            QueueOptions(max_concurrency, queue_size, queue_timeout),
        )  # fmt: skip
    except (ValidationError, CatalogError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    if require_key is None:
        require_key = bool(api_key) or not is_loopback(host)
    run(
        run_serve(
            catalog,
            host,
            port,
            api_key,
            controller_port,
            state_dir.expanduser(),
            require_key,
            insecure_plaintext,
            in_process_agents,
        )
    )


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach `host` (then keys are optional)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.command("slurm-script")
def slurm_script(
    catalog: Annotated[Path, typer.Option(help="model catalog (TOML)")],
    model: Annotated[str, typer.Option(help="the model whose job script to print")],
    controller: Annotated[
        str, typer.Option(help="host:port the agent dials (default: from the settings)")
    ] = "",
) -> None:
    """Print the batch script the slurm launcher would submit for MODEL (a dry
    run: nothing is submitted). KSCOPE_* settings and WORKER_SLURM_QOS apply."""
    from controller.catalog import load_catalog
    from controller.launchers.slurm import SlurmOptions, dry_run_script
    from controller.settings import ControllerSettings

    try:
        spec = load_catalog(catalog).get(model)
    except CatalogError as exc:
        raise typer.BadParameter(str(exc), param_hint="--catalog") from exc
    if spec is None:
        raise typer.BadParameter(f"{model!r} is not in {catalog}", param_hint="--model")
    settings = ControllerSettings()
    address = controller or settings.advertise_address or f"{settings.host}:{settings.port}"
    typer.echo(dry_run_script(spec, SlurmOptions.from_settings(settings), address), nl=False)


# The processes' own command lines, as subcommands: `kscope agent --help` is
# `kscope-agent --help` (typer passes every argument through untouched).
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


@app.command(context_settings=PASS_THROUGH, add_help_option=False)
def controller(ctx: typer.Context) -> None:
    """The control plane (`kscope-controller`); `kscope controller --help` lists its flags."""
    from controller.main import main as controller_main

    controller_main(list(ctx.args))


@app.command(context_settings=PASS_THROUGH, add_help_option=False)
def facade(ctx: typer.Context) -> None:
    """The OpenAI-compatible HTTP front door (`kscope-facade`); `kscope facade --help`."""
    from facade.main import main as facade_main

    facade_main(list(ctx.args), hand_off=True)


@app.command(context_settings=PASS_THROUGH, add_help_option=False)
def agent(ctx: typer.Context) -> None:
    """A node agent or host agent (`kscope-agent`); `kscope agent --help`."""
    from node_agent.main import main as agent_main

    agent_main(list(ctx.args), hand_off=True)


register_operator_commands(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
