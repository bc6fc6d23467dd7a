"""Pure pieces of host agents: what a host offers, the instance command it runs,
and the launchd plist and token file (node_agent/host.py, node_agent/launchd.py)."""

from __future__ import annotations

import plistlib
import sys
from pathlib import Path

import pytest

from kscope.v1 import agent_pb2
from node_agent.host import OfferError, instance_argv, parse_offers
from node_agent.launchd import (
    LaunchdError,
    LaunchdOptions,
    install,
    plist_for,
    read_token_file,
    uninstall,
    write_token_file,
)


def _model(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_offers_from_entries_and_directories(tmp_path: Path) -> None:
    one = _model(tmp_path / "elsewhere" / "qwen")
    _model(tmp_path / "models" / "a")
    _model(tmp_path / "models" / "b")
    (tmp_path / "models" / "notes").mkdir()  # no config.json: not a model
    offers = parse_offers(f"named={one}, {tmp_path / 'models'}")
    assert offers == {"named": one, "a": tmp_path / "models" / "a", "b": tmp_path / "models" / "b"}
    with pytest.raises(OfferError, match=r"no config\.json"):
        parse_offers(f"x={tmp_path}")
    with pytest.raises(OfferError, match="no such directory"):
        parse_offers(str(tmp_path / "missing"))


def test_instance_command_takes_the_catalogs_settings_and_the_hosts_weights() -> None:
    load = agent_pb2.LoadModelCommand(
        instance_id="i-1", model="m", engine="mlx_vlm", engine_args=["--x"], max_concurrency=2
    )
    argv = instance_argv(load, Path("/disk/m"))
    assert argv[:3] == [sys.executable, "-m", "node_agent.main"]
    assert argv[3:] == ["--engine", "mlx_vlm", "--model", "m", "--model-path", "/disk/m",
                        "--engine-args-json", '["--x"]', "--max-concurrency", "2"]  # fmt: skip


def test_plist_runs_the_host_agent_without_the_token(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    write_token_file(token_file, "s3cret")
    options = LaunchdOptions(
        Path("/opt/kscope/bin/kscope-agent"), "ctl:50051", token_file, "m=/models/m",
        log_dir=tmp_path / "logs", working_dir=tmp_path / "work",
    )  # fmt: skip
    plist_path = tmp_path / "agents" / "org.kscope.agent.plist"
    command = install(options, plist_path)
    assert command.startswith("launchctl bootstrap gui/") and command.endswith(str(plist_path))
    raw = plist_path.read_bytes()
    assert b"s3cret" not in raw
    plist = plistlib.loads(raw)
    assert plist == plist_for(options)
    assert plist["ProgramArguments"] == [
        "/opt/kscope/bin/kscope-agent", "--host-agent", "--controller", "ctl:50051",
        "--token-file", str(token_file), "--models", "m=/models/m",
    ]  # fmt: skip
    assert plist["RunAtLoad"] and plist["KeepAlive"]
    assert plist["StandardErrorPath"] == str(tmp_path / "logs" / "agent.log")
    assert (tmp_path / "work").is_dir() and (tmp_path / "logs").is_dir()
    assert uninstall(plist_path).endswith("/org.kscope.agent")
    assert not plist_path.exists()


def test_token_file_must_be_private_and_not_empty(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    write_token_file(token_file, "t")
    assert read_token_file(token_file) == "t"
    token_file.chmod(0o640)
    with pytest.raises(LaunchdError, match="chmod 600"):
        read_token_file(token_file)
    write_token_file(token_file, "")  # rewriting makes it private again
    with pytest.raises(LaunchdError, match="empty"):
        read_token_file(token_file)
    with pytest.raises(LaunchdError, match="cannot read"):
        read_token_file(tmp_path / "missing")
