"""Command lines generated from settings classes, and the node agent's command.

Each process (`kscope-controller`, `kscope-facade`, `kscope-agent`) takes one
`--flag-name` per field of its pydantic settings class; `--help` shows each
field's docstring, default and environment variables. A nested settings class
(the facade's `portal`) gets flags under its field's name (`--portal-ldap-url`).
Secrets (SecretStr fields) come from the environment or a file only: as a flag
they are refused, because every user of the machine can read a command line
(`ps`). docs/configuration.md is rendered from the same source:

    .venv/bin/python -m kscope_common.cli > docs/configuration.md
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, NoReturn, TypeVar

from pydantic import AliasChoices, SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

S = TypeVar("S", bound=BaseSettings)

PRECEDENCE = "Flags override environment variables, which override defaults."


@dataclass(frozen=True)
class Setting:
    """One leaf field of a settings class, as a command line sees it."""

    path: tuple[str, ...]
    """Field names from the top class down: ("port",), ("portal", "ldap_url")."""
    env: tuple[str, ...]
    """The environment variables pydantic-settings reads it from, first one preferred."""
    doc: str
    """The field's docstring, on one line."""
    kind: type
    """bool, int, float, list (JSON on the command line), Path or str."""
    secret: bool
    info: FieldInfo

    @property
    def name(self) -> str:
        return ".".join(self.path)

    @property
    def flag(self) -> str:
        return "--" + "-".join(self.path).replace("_", "-")


@dataclass(frozen=True)
class CommandLine(Generic[S]):
    """One process's command line: its settings class, plus the flag names it
    kept from before the flags were generated."""

    prog: str
    settings: type[S]
    description: str = ""
    aliases: Mapping[str, str] = field(default_factory=dict)
    """Older flag → field name (`--ca` → "tls_ca"); one naming a secret is refused too."""
    file_flags: Mapping[str, str] = field(default_factory=dict)
    """Secret field → the flag that reads it from a file (enroll_token → --token-file)."""
    docs_defaults: Mapping[str, str] = field(default_factory=dict)
    """Field → its default in words, for defaults that depend on the machine
    (docs/configuration.md must not hold one machine's paths)."""

    def settings_list(self) -> list[Setting]:
        return settings_of(self.settings)

    def parser(self) -> argparse.ArgumentParser:
        return build_parser(self)

    def overrides(self, argv: Sequence[str] | None = None) -> dict[str, Any]:
        """The settings given as flags, as keyword arguments for the settings
        class (a nested class is built here, so its environment still counts)."""
        return _nest(self.settings, self._flags(argv))

    def _flags(self, argv: Sequence[str] | None) -> dict[str, Any]:
        """The flags given, by dotted field path ("portal.ldap_url")."""
        namespace = self.parser().parse_args(argv)
        return {name: value for name, value in vars(namespace).items() if value is not None}

    def parse(self, argv: Sequence[str] | None = None) -> S:
        """The settings: flags, then environment variables, then defaults.
        Bad flags exit with status 2; bad values raise pydantic's ValidationError."""
        return self.settings(**self.overrides(argv))

    def parse_as_child(self, argv: Sequence[str], env: Mapping[str, str]) -> S:
        """The settings a process started with `argv` and `env` added to this
        process's environment would have: flags, then `env` (read by the names
        pydantic-settings reads, aliases included), then this process's
        environment, then defaults. A list in `env` is JSON, as there."""
        given: dict[str, Any] = {}
        upper = {name.upper(): value for name, value in env.items()}
        for setting in self.settings_list():
            name = next((n for n in setting.env if n in upper), None)
            if name is not None:
                value = upper[name]
                given[".".join(setting.path)] = json.loads(value) if setting.kind is list else value
        given.update(self._flags(argv))
        return self.settings(**_nest(self.settings, given))


def settings_of(cls: type[BaseSettings], path: tuple[str, ...] = ()) -> list[Setting]:
    """The leaf fields of `cls`, nested settings classes flattened, in field order."""
    found: list[Setting] = []
    for name, info in cls.model_fields.items():
        kind = _kind(info.annotation)
        if isinstance(kind, type) and issubclass(kind, BaseSettings):
            found += settings_of(kind, (*path, name))
            continue
        doc = " ".join((info.description or "").split())
        found.append(Setting((*path, name), _env_names(cls, name, info), doc, kind,
                             kind is SecretStr, info))  # fmt: skip
    return found


def _kind(annotation: Any) -> type:
    """The type a flag converts to: Optional stripped, containers as list."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return _kind(args[0])
    if typing.get_origin(annotation) in (list, tuple, set, frozenset):
        return list
    if annotation in (bool, int, float, SecretStr, Path):
        return typing.cast(type, annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseSettings):
        return annotation
    return str


def _env_names(cls: type[BaseSettings], name: str, info: FieldInfo) -> tuple[str, ...]:
    """What pydantic-settings reads: a validation alias replaces the prefixed name."""
    config = cls.model_config
    alias = info.validation_alias
    if isinstance(alias, AliasChoices):
        names = [choice for choice in alias.choices if isinstance(choice, str)]
    elif isinstance(alias, str):
        names = [alias]
    else:
        names = [f"{config.get('env_prefix', '')}{name}"]
    if not config.get("case_sensitive", False):
        names = [n.upper() for n in names]
    return tuple(names)


def default_text(setting: Setting, docs_defaults: Mapping[str, str] | None = None) -> str:
    """A setting's default as people write it (true, 300.0, "", unset)."""
    if docs_defaults and setting.name in docs_defaults:
        return docs_defaults[setting.name]
    value = setting.info.get_default(call_default_factory=True)
    if value is None or (isinstance(value, SecretStr) and not value.get_secret_value()):
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    if value == "":
        return '""'
    return str(value)


def _json_list(text: str) -> list[str]:
    """A list flag's value: a JSON list of strings; empty text is the empty list."""
    if not text.strip():
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc}): {text!r}") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError(
            f'expected a JSON list of strings, e.g. ["a", "b"]: {text!r}'
        )
    return value


_CONVERT: dict[type, tuple[Any, str]] = {
    int: (int, "INT"), float: (float, "NUMBER"), list: (_json_list, "JSON"), Path: (str, "PATH"),
}  # fmt: skip


class _RefusedSecret(argparse.Action):
    """A secret given as a flag: exit 2, saying where the secret goes instead."""

    def __init__(self, *args: Any, advice: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.advice = advice

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> NoReturn:
        parser.exit(2, f"{parser.prog}: {option_string} is a secret: {self.advice} instead; "
                    "a command line is visible to every user of the machine (ps)\n")  # fmt: skip


def secret_advice(setting: Setting, file_flags: Mapping[str, str]) -> str:
    """Where a secret goes: its environment variable, or a file flag."""
    advice = f"set {setting.env[0]} in the environment"
    if setting.name in file_flags:
        advice += f" or use {file_flags[setting.name]} FILE"
    return advice


def build_parser(cli: CommandLine[Any]) -> argparse.ArgumentParser:
    """One option per setting (a secret's refuses), with the legacy aliases."""
    parser = argparse.ArgumentParser(
        prog=cli.prog,
        description=cli.description,
        epilog=_epilog(cli),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    aliases: dict[str, list[str]] = {}
    for flag, name in cli.aliases.items():
        aliases.setdefault(name, []).append(flag)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for setting in cli.settings_list():
        target: argparse.ArgumentParser | argparse._ArgumentGroup = parser
        if len(setting.path) > 1:
            group_name = ".".join(setting.path[:-1])
            if group_name not in groups:
                groups[group_name] = parser.add_argument_group(
                    f"{group_name} settings", _group_doc(cli.settings, setting.path[:-1])
                )
            target = groups[group_name]
        flags = [setting.flag, *aliases.get(setting.name, [])]
        if setting.secret:
            target.add_argument(*flags, dest=setting.name, nargs="?", help=argparse.SUPPRESS,
                                action=_RefusedSecret,
                                advice=secret_advice(setting, cli.file_flags))  # fmt: skip
            continue
        help_text = _help(setting).replace("%", "%%")
        if setting.kind is bool:
            target.add_argument(*flags, dest=setting.name, default=None, help=help_text,
                                action=argparse.BooleanOptionalAction)  # fmt: skip
            continue
        convert, metavar = _CONVERT.get(setting.kind, (str, "TEXT"))
        target.add_argument(*flags, dest=setting.name, type=convert, metavar=metavar,
                            help=help_text)  # fmt: skip
    return parser


def _group_doc(cls: type[BaseSettings], path: tuple[str, ...]) -> str:
    info = cls.model_fields[path[0]]
    if len(path) > 1:
        return _group_doc(typing.cast(type[BaseSettings], _kind(info.annotation)), path[1:])
    return " ".join((info.description or "").split())


def _help(setting: Setting) -> str:
    return f"{setting.doc} [default: {default_text(setting)}] [env: {', '.join(setting.env)}]"


def _epilog(cli: CommandLine[Any]) -> str:
    lines = [PRECEDENCE]
    secrets = [s for s in cli.settings_list() if s.secret]
    if secrets:
        lines += ["", "secrets (never flags: a command line is visible to every user):"]
        for setting in secrets:
            where = f"{', '.join(setting.env)} ({setting.name})"
            if setting.name in cli.file_flags:
                where += f"; or {cli.file_flags[setting.name]} FILE"
            lines.append(f"  {where}")
            lines += textwrap.wrap(setting.doc, 76, initial_indent="      ",
                                   subsequent_indent="      ")  # fmt: skip
    return "\n".join(lines)


def _nest(cls: type[BaseSettings], given: Mapping[str, Any]) -> dict[str, Any]:
    """Flat "portal.ldap_url" keys → keyword arguments, nested classes built."""
    kwargs: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for name, value in given.items():
        head, dot, rest = name.partition(".")
        if dot:
            nested.setdefault(head, {})[rest] = value
        else:
            kwargs[name] = value
    for head, values in nested.items():
        sub = typing.cast(type[BaseSettings], _kind(cls.model_fields[head].annotation))
        kwargs[head] = sub(**_nest(sub, values))
    return kwargs


# --- the reference document ---


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(command_lines: Sequence[CommandLine[Any]]) -> str:
    """docs/configuration.md: every setting of every process, one table each."""
    out = [
        "# Configuration",
        "",
        "<!-- Generated from the settings classes; do not edit. Regenerate with:",
        "     .venv/bin/python -m kscope_common.cli > docs/configuration.md -->",
        "",
        "Every process reads one settings class; each of its fields is a flag and",
        "an environment variable, and `--help` lists them as this page does.",
        PRECEDENCE,
        "Secrets are never flags, since a command line is visible to every user of",
        "the machine: they come from the environment (or a file, where a flag says",
        "so), and a process given one as a flag refuses to start.",
        "`kscope controller|facade|agent ARGS` runs the same commands.",
    ]
    for cli in command_lines:
        aliases: dict[str, list[str]] = {}
        for flag, name in cli.aliases.items():
            aliases.setdefault(name, []).append(flag)
        summary = " ".join(cli.description.strip().split("\n\n")[0].split())
        out += ["", f"## `{cli.prog}`", "", _cell(summary), ""]
        out += ["| Flag | Environment | Default | Meaning |", "| --- | --- | --- | --- |"]
        for setting in cli.settings_list():
            if setting.secret:
                flags = "none (secret)"
                if setting.name in cli.file_flags:
                    flags += f"; `{cli.file_flags[setting.name]} FILE`"
            else:
                flags = ", ".join(f"`{f}`" for f in [setting.flag, *aliases.get(setting.name, [])])
            env = ", ".join(f"`{e}`" for e in setting.env)
            default = cli.docs_defaults.get(setting.name) or default_text(setting)
            if default != "unset" and setting.name not in cli.docs_defaults:
                default = f"`{default}`"
            out.append(f"| {_cell(flags)} | {env} | {_cell(default)} | {_cell(setting.doc)} |")
    return "\n".join(out) + "\n"


def process_command_lines() -> list[CommandLine[Any]]:
    """The three processes' command lines (imported late: kscope_common sits
    below controller, facade and node_agent)."""
    from controller.main import COMMAND_LINE as controller
    from facade.main import COMMAND_LINE as facade
    from node_agent.main import COMMAND_LINE as agent

    return [controller, facade, agent]


# --- the node agent's command, for every launcher ---


@dataclass(frozen=True)
class AgentCommand:
    """What an instance's agent is started with; the rest (controller, instance,
    token) travels in its environment."""

    engine: str
    model: str
    model_path: str = ""
    upstream_url: str = ""
    upstream_model: str = ""
    upstream_ca_bundle: str = ""
    upstream_insecure_skip_verify: bool = False
    engine_args: Sequence[str] = ()
    max_concurrency: int | None = None
    queue_size: int | None = None
    queue_timeout_s: float | None = None
    aliases: Sequence[str] = ()
    """Other names the engine answers to."""
    lora_modules: Sequence[str] = ()
    """LoRA adapters the engine serves, each NAME=PATH."""


def agent_argv(command: AgentCommand, python: str = sys.executable) -> list[str]:
    """The `kscope-agent` command line (as `python -m node_agent.main`) of one
    instance: the launchers' and the host agent's alike. It holds no secret."""
    return [python, "-m", "node_agent.main", *agent_flags(command)]


def agent_flags(command: AgentCommand) -> list[str]:
    """The flags of agent_argv alone (what an agent run in-process parses)."""
    argv = ["--engine", command.engine, "--model", command.model]
    if command.model_path:
        argv += ["--model-path", command.model_path]
    if command.upstream_url:
        argv += ["--upstream-url", command.upstream_url]
    if command.upstream_model:
        argv += ["--upstream-model", command.upstream_model]
    if command.upstream_ca_bundle:
        argv += ["--upstream-ca-bundle", command.upstream_ca_bundle]
    if command.upstream_insecure_skip_verify:
        argv += ["--upstream-insecure-skip-verify"]
    if command.engine_args:
        argv += ["--engine-args-json", json.dumps(list(command.engine_args))]
    if command.max_concurrency is not None:
        argv += ["--max-concurrency", str(command.max_concurrency)]
    if command.queue_size is not None:
        argv += ["--queue-size", str(command.queue_size)]
    if command.queue_timeout_s is not None:
        argv += ["--queue-timeout", str(command.queue_timeout_s)]
    if command.aliases:
        argv += ["--aliases", json.dumps(list(command.aliases))]
    if command.lora_modules:
        argv += ["--lora-modules", json.dumps(list(command.lora_modules))]
    return argv


if __name__ == "__main__":
    sys.stdout.write(render_markdown(process_command_lines()))
