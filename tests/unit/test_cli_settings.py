"""The processes' command lines come from their settings classes
(kscope_common/cli.py): every field is a flag with its docstring, default and
environment variables in --help; secrets are refused as flags; the older flag
names still work; docs/configuration.md is rendered from the same source."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from pydantic_settings import BaseSettings

from controller import main as controller_main
from controller.settings import ControllerSettings
from facade import main as facade_main
from facade.settings import FacadeSettings
from kscope_common.cli import CommandLine, process_command_lines, render_markdown
from node_agent import main as agent_main
from node_agent.launchd import write_token_file
from node_agent.settings import AgentSettings

ROOT = Path(__file__).resolve().parents[2]

PROCESSES: list[tuple[CommandLine[Any], Callable[[list[str]], BaseSettings]]] = [
    (controller_main.COMMAND_LINE, controller_main.parse_settings),
    (facade_main.COMMAND_LINE, facade_main.parse_settings),
    (agent_main.COMMAND_LINE, agent_main.parse_settings),
]
IDS = [cli.prog for cli, _ in PROCESSES]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No setting from the machine running the tests; a wide help text."""
    for cli, _ in PROCESSES:
        for setting in cli.settings_list():
            for name in setting.env:
                monkeypatch.delenv(name, raising=False)
    for name in list(os.environ):
        if name.startswith("KSCOPE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("COLUMNS", "120")
    yield


def leaf_fields(cls: type[BaseSettings], prefix: str = "") -> dict[str, Any]:
    """Field path → FieldInfo, nested settings classes walked (independently of cli.py)."""
    fields: dict[str, Any] = {}
    for name, info in cls.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseSettings):
            fields |= leaf_fields(annotation, f"{prefix}{name}.")
        else:
            fields[prefix + name] = info
    return fields


def is_secret(info: Any) -> bool:
    return SecretStr in (info.annotation, *getattr(info.annotation, "__args__", ()))


def flag_of(path: str) -> str:
    return "--" + path.replace(".", "-").replace("_", "-")


def help_text(
    parse: Callable[[list[str]], BaseSettings], capsys: pytest.CaptureFixture[str]
) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse(["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def squeezed(text: str) -> str:
    return re.sub(r"\s+", "", text)


@pytest.mark.parametrize(("cli", "parse"), PROCESSES, ids=IDS)
def test_help_lists_every_setting(
    cli: CommandLine[Any],
    parse: Callable[[list[str]], BaseSettings],
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = help_text(parse, capsys)
    usage = text.split("\n\n")[0]
    fields = leaf_fields(cli.settings)
    expected_flags = {"-h"}
    for path, info in fields.items():
        if is_secret(info):
            continue
        expected_flags.add(flag_of(path))
        if info.annotation in (bool, bool | None):
            expected_flags.add(flag_of(path).replace("--", "--no-", 1))
    # The usage line names exactly one flag (and --no-flag) per non-secret field.
    assert set(re.findall(r"(?<![\w-])--?[a-z][a-z0-9-]*", usage)) == expected_flags
    flat = squeezed(text)
    for path, info in fields.items():
        setting = next(s for s in cli.settings_list() if s.name == path)
        assert info.description, f"{path} has no docstring"
        assert squeezed(info.description.replace("\n", " ")) in flat, path
        for env in setting.env:
            assert env in text, (path, env)
        if is_secret(info):
            assert f"{setting.env[0]} ({path})" in text  # the secrets section
        else:
            assert squeezed(f"[env: {', '.join(setting.env)}]") in flat, path
            assert "[default:" in text


def test_environment_names_and_defaults_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    text = squeezed(help_text(controller_main.parse_settings, capsys))
    assert squeezed("[default: 50051] [env: KSCOPE_PORT]") in text
    assert squeezed("[env: KSCOPE_SSH_HOST, SSH_HOST]") in text
    assert squeezed("[default: true] [env: KSCOPE_STOP_INSTANCES_ON_EXIT]") in text
    facade = squeezed(help_text(facade_main.parse_settings, capsys))
    assert squeezed("[default: 8000] [env: KSCOPE_PORT, PROXY_PORT]") in facade
    assert squeezed("--portal-ldap-url TEXT") in facade
    assert squeezed("[env: KSCOPE_PORTAL_LDAP_URL]") in facade


@pytest.mark.parametrize(
    ("parse", "argv", "advice"),
    [
        (facade_main.parse_settings, ["--api-key", "s3cret-value"], "set KSCOPE_API_KEY"),
        (facade_main.parse_settings, ["--api-key=s3cret-value"], "set KSCOPE_API_KEY"),
        (facade_main.parse_settings, ["--enroll-token", "s3cret-value"], "set KSCOPE_ENROLL_TOKEN"),
        (facade_main.parse_settings, ["--portal-service-key", "s3cret-value"],
         "set KSCOPE_PORTAL_SERVICE_KEY"),
        (facade_main.parse_settings, ["--portal-ldap-bind-password", "s3cret-value"],
         "set KSCOPE_PORTAL_LDAP_BIND_PASSWORD"),
        (agent_main.parse_settings, ["--enroll-token", "s3cret-value"],
         "set KSCOPE_ENROLL_TOKEN in the environment or use --token-file"),
        (agent_main.parse_settings, ["--registration-token", "s3cret-value"],
         "set KSCOPE_ENROLL_TOKEN"),
        (agent_main.parse_settings, ["--upstream-api-key", "s3cret-value"],
         "set KSCOPE_UPSTREAM_API_KEY"),
    ],
)  # fmt: skip
def test_a_secret_flag_is_refused(
    parse: Callable[[list[str]], BaseSettings],
    argv: list[str],
    advice: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse(["--port", "1", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    flag = argv[0].split("=")[0]
    assert f"{flag} is a secret: {advice}" in err
    assert "visible to every user" in err
    assert "s3cret-value" not in err


def test_the_older_agent_flags_still_work(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    write_token_file(token_file, "host-token")
    settings = agent_main.parse_settings(
        ["--model-type", "openai", "--model", "m", "--upstream-url", "http://u:1/v1",
         "--engine-args-json", '["--a", "b"]', "--queue-timeout", "7.5", "--max-concurrency",
         "2", "--queue-size", "3", "--models", "m=/x", "--ca", "PEM", "--insecure-plaintext",
         "--host-agent", "--token-file", str(token_file), "--host", "@node", "--port", "5"]
    )  # fmt: skip
    assert isinstance(settings, AgentSettings)
    assert settings.engine == "openai" and settings.model == "m"
    assert settings.upstream_url == "http://u:1/v1"
    assert settings.engine_args == ["--a", "b"]
    assert settings.queue_timeout_s == 7.5
    assert (settings.max_concurrency, settings.queue_size) == (2, 3)
    assert settings.host_models == "m=/x" and settings.tls_ca == "PEM"
    assert settings.insecure_plaintext and settings.host_agent
    assert settings.enroll_token.get_secret_value() == "host-token"
    assert (settings.host, settings.port) == ("@node", 5)
    assert agent_main.parse_settings(["--engine-args-json", ""]).engine_args == []


def test_a_bad_json_list_names_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        agent_main.parse_settings(["--engine-args-json", '{"a": 1}'])
    assert exit_info.value.code == 2
    assert "--engine-args-json" in capsys.readouterr().err


def test_the_older_controller_and_facade_flags_still_work(tmp_path: Path) -> None:
    controller = controller_main.parse_settings(
        ["--host", "0.0.0.0", "--port", "0", "--port-file", str(tmp_path / "p"),
         "--state-dir", str(tmp_path), "--catalog", str(tmp_path / "c.toml"), "--mesh-port", "9"]
    )  # fmt: skip
    assert isinstance(controller, ControllerSettings)
    assert (controller.host, controller.port, controller.mesh_port) == ("0.0.0.0", 0, 9)
    assert controller.port_file == tmp_path / "p" and controller.state_dir == tmp_path
    assert controller.catalog == tmp_path / "c.toml"
    facade = facade_main.parse_settings(
        ["--port", "0", "--port-file", str(tmp_path / "f"), "--controller", "c:1", "--ca", "PEM"]
    )
    assert isinstance(facade, FacadeSettings)
    assert (facade.port, facade.controller, facade.tls_ca) == (0, "c:1", "PEM")
    assert facade.port_file == tmp_path / "f"


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KSCOPE_QUEUE_SIZE", "11")
    monkeypatch.setenv("KSCOPE_MODEL", "from-env")
    settings = agent_main.parse_settings(["--queue-size", "12"])
    assert isinstance(settings, AgentSettings)
    assert (settings.queue_size, settings.model) == (12, "from-env")
    monkeypatch.setenv("KSCOPE_PORTAL_LDAP_URL", "ldap://env:389")
    facade = facade_main.parse_settings(["--portal-ldap-timeout-s", "2", "--no-require-key"])
    assert isinstance(facade, FacadeSettings)
    # A nested class given one flag still reads its other settings from the environment.
    assert (facade.portal.ldap_timeout_s, facade.portal.ldap_url) == (2.0, "ldap://env:389")
    assert facade.require_key is False


def _other_value(info: Any, flag: str) -> tuple[list[str], Any]:
    """A flag and value differing from the field's default, and what it parses to."""
    default = info.get_default(call_default_factory=True)
    kind = info.annotation
    if kind in (bool, bool | None):
        return ([flag.replace("--", "--no-", 1)], False) if default else ([flag], True)
    if kind in (int, int | None):
        return [flag, str((default or 0) + 1)], (default or 0) + 1
    if kind in (float, float | None):
        return [flag, str((default or 0) + 1.5)], (default or 0) + 1.5
    if kind in (Path, Path | None):
        return [flag, "/elsewhere/x"], Path("/elsewhere/x")
    if kind == list[str]:
        return [flag, '["a", "b c"]'], ["a", "b c"]
    return [flag, "x1"], "x1"


EXCLUSIVE = frozenset({"upstream_insecure_skip_verify"})
"""Fields refused together with another field's non-default value (upstream_ca_bundle)."""


@pytest.mark.parametrize(("cli", "parse"), PROCESSES, ids=IDS)
def test_every_flag_reaches_its_field(
    cli: CommandLine[Any], parse: Callable[[list[str]], BaseSettings]
) -> None:
    fields = {
        path: info
        for path, info in leaf_fields(cli.settings).items()
        # A secret is no flag; the token file must exist.
        if not is_secret(info) and path != "token_file"
    }
    # Settings that exclude each other are given in a second command line.
    apart = {p: fields.pop(p) for p in EXCLUSIVE if p in fields}
    for group in (fields, apart):
        if not group:
            continue
        argv: list[str] = []
        expected: dict[str, Any] = {}
        for path, info in group.items():
            args, value = _other_value(info, flag_of(path))
            argv += args
            expected[path] = value
        settings: Any = parse(argv)
        for path, value in expected.items():
            got = settings
            for part in path.split("."):
                got = getattr(got, part)
            assert got == value, path


def test_configuration_doc_is_current() -> None:
    rendered = render_markdown(process_command_lines())
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert doc == rendered, (
        "docs/configuration.md is stale: .venv/bin/python -m kscope_common.cli "
        "> docs/configuration.md"
    )
    for cli in process_command_lines():
        for setting in cli.settings_list():
            assert f"`{setting.env[0]}`" in doc


def test_kscope_subcommands_are_the_processes_commands() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KSCOPE_")}
    shown = subprocess.run(
        [sys.executable, "-m", "kscope_cli.main", "agent", "--help"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("usage: kscope-agent")
    assert "--engine-args-json" in shown.stdout
    refused = subprocess.run(
        [sys.executable, "-m", "kscope_cli.main", "facade", "--api-key", "s3cret-value"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 2
    assert "kscope-facade: --api-key is a secret: set KSCOPE_API_KEY" in refused.stderr
