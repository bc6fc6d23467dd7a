"""Fewer malloc arenas in our long-running processes.

glibc gives each thread that allocates its own arena (up to eight per core),
and gRPC's threads allocate every message's buffers. Memory freed in those
arenas is mostly kept, not returned: an agent that relayed sixteen long streams
on one call each stayed 16-34 MiB larger than before, though nothing was held
(measured by tests/integration/test_stream_life.py; 5-16 MiB with two arenas).
Two arenas are what the Python servers that document this (gunicorn, for one)
advise. An operator's own MALLOC_ARENA_MAX wins.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_ARENA_MAX = -8
"""mallopt's parameter number for the arena limit (glibc's malloc.h)."""
ARENAS = 2


def limit_malloc_arenas(arenas: int = ARENAS) -> bool:
    """Cap glibc's arenas for threads started from now on; False where not applied
    (not Linux, not glibc, or MALLOC_ARENA_MAX already set)."""
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # a libc without mallopt (musl)
        return False
    return bool(mallopt(M_ARENA_MAX, arenas))
