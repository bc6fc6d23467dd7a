"""Secrets out of /proc/<pid>/environ: a process started with a secret in its
environment re-executes itself once without it, handing the value over a pipe.

Removing a variable from os.environ only keeps it from children: the kernel
shows the environment a process was started with (`/proc/<pid>/environ`,
`ps e`) for its whole life. After the re-exec that block no longer holds the
secret; the process reads it from the inherited pipe, once.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

HANDOFF_VARIABLE = "KSCOPE_SECRET_HANDOFF_FD"
"""Names the file descriptor the secrets wait on (not a secret itself)."""


def reexec_without(names: Sequence[str]) -> None:
    """Re-exec this process without the variables `names` (when any is set),
    passing their values on a pipe; returns only when there is nothing to hide."""
    present = {name: os.environ[name] for name in names if os.environ.get(name)}
    if not present or HANDOFF_VARIABLE in os.environ:
        return
    payload = json.dumps(present).encode()
    read_end, write_end = os.pipe()
    os.write(write_end, payload)  # a few hundred bytes: well within a pipe's buffer
    os.close(write_end)
    os.set_inheritable(read_end, True)
    env = {k: v for k, v in os.environ.items() if k not in present}
    env[HANDOFF_VARIABLE] = str(read_end)
    os.execve(sys.executable, sys.orig_argv, env)


def take_handed_over() -> None:
    """Put the secrets handed over by `reexec_without` back into os.environ
    (this process's copy only: settings read them there; children started
    later must scrub them, as agents do)."""
    fd_text = os.environ.pop(HANDOFF_VARIABLE, None)
    if fd_text is None:
        return
    with os.fdopen(int(fd_text), "rb") as pipe:
        os.environ.update(json.loads(pipe.read()))
