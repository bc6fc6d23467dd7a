"""Running shell commands where SLURM's commands are: over one long-lived SSH
connection to a login node, or on this machine when the controller runs on one.

Both runners take a shell command line and optional stdin, and return what the
command printed. Every command has a timeout. The SSH runner keeps a single
connection (asyncssh multiplexes commands over it) and re-establishes it with
backoff when it drops; host keys are checked against a known_hosts file unless
checking was turned off explicitly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import asyncssh

from kscope_common.retry import SLURM, Backoff, RetryLater

log = logging.getLogger(__name__)


class RemoteError(Exception):
    """Base of the runners' errors."""


class RemoteUnavailable(RemoteError, RetryLater):
    """The command could not run now; worth retrying later (the delay says when)."""

    def __init__(self, message: str, retry_in_s: float = 1.0, maybe_ran: bool = False):
        super().__init__(message)
        self.retry_in_s = retry_in_s
        self.maybe_ran = maybe_ran
        """The command was sent before the failure, so it may have taken effect."""


class RemoteRefused(RemoteUnavailable):
    """The login node refused us (unknown or changed host key, key rejected):
    a configuration problem that retrying alone will not fix."""


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class CommandRunner(Protocol):
    """Runs shell command lines where SLURM's commands are."""

    description: str
    """Where commands run, for messages ("ssh root@login:22", "this machine")."""

    async def run(
        self, command: str, stdin: str | None = None, timeout_s: float = 30.0, retry: bool = False
    ) -> CommandResult:
        """Run `command`; with `retry`, run it once more on a fresh connection if
        the old one turned out to be dead (only for commands safe to repeat)."""
        ...

    async def close(self) -> None: ...


class LocalRunner:
    """Runs commands on this machine (`/bin/sh -c`), from the user's home directory."""

    description = "this machine"

    async def run(
        self, command: str, stdin: str | None = None, timeout_s: float = 30.0, retry: bool = False
    ) -> CommandResult:
        try:
            proc = await asyncio.create_subprocess_exec(
                "/bin/sh", "-c", command,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, cwd=Path.home(), start_new_session=True,
            )  # fmt: skip
        except OSError as exc:
            raise RemoteUnavailable(f"cannot run {command.split()[0]}: {exc}") from exc
        try:
            out, err = await asyncio.wait_for(
                proc.communicate(stdin.encode() if stdin is not None else None), timeout_s
            )
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            await proc.wait()
            raise RemoteUnavailable(
                f"{command.split()[0]} took longer than {timeout_s:.0f}s", maybe_ran=True
            ) from None
        return CommandResult(proc.returncode or 0, out.decode(errors="replace"),
                             err.decode(errors="replace"))  # fmt: skip

    async def close(self) -> None:
        return None


@dataclass(frozen=True)
class SshTarget:
    """Where and how to log in."""

    host: str
    port: int = 22
    username: str = ""
    """Empty: the local user's name."""
    key: Path | None = None
    """Private key; None: ~/.ssh/id_* and the ssh agent."""
    known_hosts: Path | None = None
    """None: ~/.ssh/known_hosts."""
    check_host_key: bool = True
    connect_timeout_s: float = 10.0
    keepalive_s: float = 15.0
    """Probe an idle connection this often, so a dead one is noticed."""

    def __str__(self) -> str:
        user = f"{self.username}@" if self.username else ""
        return f"ssh {user}{self.host}:{self.port}"


class _Client(asyncssh.SSHClient):
    """Tells the runner when its connection is gone."""

    def __init__(self, runner: SshRunner):
        self._runner = runner

    def connection_lost(self, exc: Exception | None) -> None:
        self._runner._lost(self, exc)


class SshRunner:
    """One long-lived SSH connection, re-established with backoff when it drops."""

    def __init__(self, target: SshTarget):
        asyncssh_log = logging.getLogger("asyncssh")
        if asyncssh_log.level == logging.NOTSET:
            # asyncssh logs every channel at INFO: a line per squeue poll.
            asyncssh_log.setLevel(logging.WARNING)
        self.target = target
        self.description = str(target)
        self._conn: asyncssh.SSHClientConnection | None = None
        self._client: _Client | None = None
        self._connecting = asyncio.Lock()
        self._backoff = Backoff(SLURM)
        self._next_attempt_at = 0.0
        self._last_error: RemoteUnavailable | None = None

    def _lost(self, client: _Client, exc: Exception | None) -> None:
        if client is self._client:
            if exc is not None:
                log.warning("%s: connection lost: %s", self.target, exc)
            self._conn = self._client = None

    async def _connection(self) -> asyncssh.SSHClientConnection:
        async with self._connecting:
            if self._conn is not None:
                return self._conn
            wait = self._next_attempt_at - time.monotonic()
            if wait > 0 and self._last_error is not None:
                raise type(self._last_error)(
                    f"{self._last_error}; next attempt in {wait:.0f}s", retry_in_s=wait
                )
            try:
                self._conn, self._client = await self._connect()
            except RemoteUnavailable as exc:
                delay = self._backoff.next_delay()
                self._next_attempt_at = time.monotonic() + delay
                exc.retry_in_s = delay
                self._last_error = exc
                log.error("%s", exc)
                raise
            if self._backoff.failures:
                log.info("%s: connected again after %d failed attempts", self.target,
                         self._backoff.failures)  # fmt: skip
            self._backoff.reset()
            self._last_error = None
            return self._conn

    async def _connect(self) -> tuple[asyncssh.SSHClientConnection, _Client]:
        t = self.target
        client = _Client(self)
        known_hosts: str | tuple[()] | None
        if not t.check_host_key:
            known_hosts = None  # the operator turned checking off explicitly
        elif t.known_hosts is not None:
            known_hosts = str(t.known_hosts)
        else:
            known_hosts = ()  # asyncssh's default: ~/.ssh/known_hosts
        try:
            conn = await asyncio.wait_for(
                asyncssh.connect(
                    t.host,
                    port=t.port,
                    username=t.username or (),
                    client_keys=[str(t.key)] if t.key is not None else (),
                    known_hosts=known_hosts,
                    client_factory=lambda: client,
                    connect_timeout=t.connect_timeout_s,
                    keepalive_interval=t.keepalive_s,
                    keepalive_count_max=3,
                    # Key authentication only: nothing interactive can answer here.
                    password_auth=False,
                    kbdint_auth=False,
                ),
                t.connect_timeout_s + 1,
            )
        except asyncssh.HostKeyNotVerifiable as exc:
            where = t.known_hosts or "~/.ssh/known_hosts"
            raise RemoteRefused(
                f"{t}: host key not trusted ({exc.reason}): it is missing from {where} or "
                "differs from the key recorded there. Refusing to connect. Add the login "
                "node's key (ssh-keyscan) after checking it, or set "
                "KSCOPE_SSH_INSECURE_NO_HOST_KEY_CHECK=1 to skip the check."
            ) from exc
        except asyncssh.PermissionDenied as exc:
            key = t.key or "~/.ssh/id_* and the ssh agent"
            raise RemoteRefused(f"{t}: key authentication failed (key: {key})") from exc
        except (asyncssh.Error, OSError) as exc:
            raise RemoteUnavailable(f"{t}: cannot connect: {exc}") from exc
        except TimeoutError:
            raise RemoteUnavailable(
                f"{t}: no connection within {t.connect_timeout_s:.0f}s"
            ) from None
        log.info("%s: connected", t)
        return conn, client

    async def run(
        self, command: str, stdin: str | None = None, timeout_s: float = 30.0, retry: bool = False
    ) -> CommandResult:
        attempts = 2 if retry else 1
        for attempt in range(attempts):
            conn = await self._connection()
            try:
                result = await conn.run(command, input=stdin, check=False, timeout=timeout_s)
            except asyncssh.TimeoutError:
                # A command that hangs may mean a connection that hangs: start afresh.
                self._drop(conn)
                raise RemoteUnavailable(
                    f"{self.target}: {command.split()[0]} took longer than {timeout_s:.0f}s",
                    maybe_ran=True,
                ) from None
            except (asyncssh.Error, OSError) as exc:
                self._drop(conn)
                if attempt + 1 < attempts:
                    log.info("%s: connection was dead (%s); reconnecting", self.target, exc)
                    continue
                raise RemoteUnavailable(
                    f"{self.target}: connection lost running {command.split()[0]}: {exc}",
                    maybe_ran=True,
                ) from exc
            return CommandResult(
                result.exit_status if result.exit_status is not None else -1,
                _text(result.stdout),
                _text(result.stderr),
            )
        raise AssertionError("unreachable")

    def _drop(self, conn: asyncssh.SSHClientConnection) -> None:
        if self._conn is conn:
            self._conn = self._client = None
        conn.close()

    async def close(self) -> None:
        conn, self._conn, self._client = self._conn, None, None
        if conn is not None:
            conn.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.wait_closed(), 5)


def _text(data: object) -> str:
    if data is None:
        return ""
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return str(data)
