"""`kscope-agent install-launchd` / `uninstall-launchd`: a Mac joins the fleet as
a host agent that launchd starts at login and restarts when it exits.

The LaunchAgent plist runs the installed `kscope-agent --host-agent` with the
controller's address, the models this Mac offers, the cluster CA and a token
*file* (the host's enrollment token, from `kscope hosts add NAME`): the token
itself never goes into the plist (which any local user may read, and which
`ps` would show as arguments); the file is readable by its owner only.
"""

from __future__ import annotations

import argparse
import os
import plistlib
import shutil
import stat
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LABEL = "org.kscope.agent"


class LaunchdError(Exception):
    """The plist cannot be installed as asked; the message says why."""


@dataclass(frozen=True)
class LaunchdOptions:
    """What the LaunchAgent runs."""

    program: Path
    """The installed kscope-agent."""
    controller: str
    token_file: Path
    models: str
    """--models of the host agent: NAME=PATH entries or model directories."""
    label: str = LABEL
    log_dir: Path = Path("~/Library/Logs/kscope")
    working_dir: Path = Path("~/.kscope/host")
    environment: dict[str, str] = field(default_factory=dict)


def default_plist_path(label: str = LABEL) -> Path:
    return Path("~/Library/LaunchAgents").expanduser() / f"{label}.plist"


def installed_program() -> Path:
    """The kscope-agent of this installation: beside the running interpreter
    (a venv's bin), else the one on PATH."""
    beside = Path(sys.executable).parent / "kscope-agent"
    if beside.is_file():
        return beside
    found = shutil.which("kscope-agent")
    if found is None:
        raise LaunchdError("kscope-agent is not installed (pip install kscope)")
    return Path(found)


def plist_for(options: LaunchdOptions) -> dict[str, Any]:
    """The LaunchAgent property list (pure)."""
    logs = options.log_dir.expanduser()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONUNBUFFERED": "1"}
    arguments = [
        str(options.program), "--host-agent",
        "--controller", options.controller,
        "--token-file", str(options.token_file.expanduser()),
        "--models", options.models,
    ]  # fmt: skip
    return {
        "Label": options.label,
        "ProgramArguments": arguments,
        "RunAtLoad": True,
        "KeepAlive": True,
        "ProcessType": "Background",
        "WorkingDirectory": str(options.working_dir.expanduser()),
        "StandardOutPath": str(logs / "agent.log"),
        "StandardErrorPath": str(logs / "agent.log"),
        "EnvironmentVariables": {**env, **options.environment},
    }


def write_token_file(path: Path, token: str) -> None:
    """Create the token file readable and writable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    os.chmod(path, 0o600)  # O_CREAT's mode does not apply to an existing file


def read_token_file(path: Path) -> str:
    """The token, refusing a file that others may read."""
    try:
        info = path.stat()
        token = path.read_text().strip()
    except OSError as exc:
        raise LaunchdError(f"cannot read the token file {path}: {exc}") from exc
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise LaunchdError(
            f"the token file {path} is readable by others (mode "
            f"{stat.S_IMODE(info.st_mode):o}); chmod 600 it"
        )
    if not token:
        raise LaunchdError(f"the token file {path} is empty")
    return token


def install(options: LaunchdOptions, plist_path: Path) -> str:
    """Write the plist (and create its directories); return the command that
    loads it. The token file must exist and be private."""
    read_token_file(options.token_file.expanduser())
    for folder in (options.log_dir, options.working_dir, plist_path.parent):
        folder.expanduser().mkdir(parents=True, exist_ok=True)
    content = plistlib.dumps(plist_for(options))
    with tempfile.NamedTemporaryFile(dir=plist_path.parent, delete=False) as tmp:
        tmp.write(content)
    os.replace(tmp.name, plist_path)
    os.chmod(plist_path, 0o644)
    return f"launchctl bootstrap gui/{os.getuid()} {plist_path}"


def uninstall(plist_path: Path, label: str = LABEL) -> str:
    """Remove the plist; return the command that stops the running agent."""
    plist_path.unlink(missing_ok=True)
    return f"launchctl bootout gui/{os.getuid()}/{label}"


def main(argv: list[str]) -> int:
    """`kscope-agent install-launchd …` or `kscope-agent uninstall-launchd …`."""
    parser = argparse.ArgumentParser(prog="kscope-agent", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    inst = commands.add_parser("install-launchd", help="write the LaunchAgent plist")
    inst.add_argument("--controller", default=os.environ.get("KSCOPE_CONTROLLER", ""),
                      help="controller host:port")  # fmt: skip
    inst.add_argument("--token-file", type=Path, default=Path("~/.kscope/host-token"),
                      help="file holding the host's enrollment token (created from "
                      "KSCOPE_ENROLL_TOKEN when it does not exist)")  # fmt: skip
    inst.add_argument("--ca", type=Path, default=None,
                      help="the cluster CA certificate (`kscope ca` prints it)")  # fmt: skip
    inst.add_argument("--models", required=True, help="NAME=PATH entries or model directories")
    inst.add_argument("--path", type=Path, help="the plist (default ~/Library/LaunchAgents/)")
    inst.add_argument("--label", default=LABEL)
    inst.add_argument("--log-dir", type=Path, default=Path("~/Library/Logs/kscope"))
    inst.add_argument("--working-dir", type=Path, default=Path("~/.kscope/host"))
    rm = commands.add_parser("uninstall-launchd", help="remove the LaunchAgent plist")
    rm.add_argument("--path", type=Path)
    rm.add_argument("--label", default=LABEL)
    args = parser.parse_args(argv)
    path = (args.path or default_plist_path(args.label)).expanduser()
    try:
        if args.command == "uninstall-launchd":
            print(f"removed {path}; stop the agent with:\n  {uninstall(path, args.label)}")
            return 0
        if not args.controller:
            raise LaunchdError("--controller is required (or KSCOPE_CONTROLLER)")
        token_file = args.token_file.expanduser()
        token = os.environ.get("KSCOPE_ENROLL_TOKEN", "")
        if not token_file.exists() and token:
            write_token_file(token_file, token)
        environment = {}
        if args.ca is not None:
            if not args.ca.expanduser().is_file():
                raise LaunchdError(f"--ca {args.ca}: no such file")
            environment["KSCOPE_TLS_CA"] = str(args.ca.expanduser().resolve())
        elif not os.environ.get("KSCOPE_TLS_CA"):
            raise LaunchdError("--ca is required: the cluster CA certificate (`kscope ca`)")
        else:
            environment["KSCOPE_TLS_CA"] = os.environ["KSCOPE_TLS_CA"]
        options = LaunchdOptions(
            installed_program(), args.controller, token_file, args.models, args.label,
            args.log_dir, args.working_dir, environment,
        )  # fmt: skip
        command = install(options, path)
    except LaunchdError as exc:
        print(f"kscope-agent: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}; start the agent with:\n  {command}")
    return 0
