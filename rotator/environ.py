"""Erase variables from the process's exec-time environment block (``/proc/<pid>/environ``).

``os.environ.pop`` (libc ``unsetenv``) only drops a variable from the C ``environ``
array. The kernel keeps showing the block the process was started with: the file
``/proc/<pid>/environ`` is the memory between ``env_start`` and ``env_end`` (fields 50
and 51 of ``/proc/self/stat``), on the initial stack, and it still holds
``LINUXGUARD_API_KEY=...`` for the whole life of a ``watch`` or a slow ``rotate``.

:func:`scrub_exec_environ` overwrites the ``NAME=value`` entries of the names given with
NUL bytes, in place (``ctypes.memset``), then re-reads ``/proc/self/environ`` to verify.
Only call it for variables already *removed* from ``os.environ``: after ``unsetenv``
nothing in the process points into those bytes any more, so erasing them cannot change
what the process or an SDK reads later. Variables still in use (``VAULT_TOKEN``, read
lazily by the Vault login) are left alone.

Linux only; elsewhere (or when ``/proc`` or ``ctypes`` is unusable) it does nothing and
logs at debug level. It never raises.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

log = logging.getLogger("lg_rotate.environ")

PROC_SELF = "/proc/self"
_ENV_START_FIELD = 50  # proc(5): env_start, env_end (since Linux 3.5)


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def environ_bounds(proc: str = PROC_SELF) -> tuple[int, int]:
    """``(env_start, env_end)`` of this process, from ``/proc/self/stat``."""
    stat = _read(f"{proc}/stat")
    # Field 2 (comm) is in parentheses and may hold spaces or ')': split after the last ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    first = 3  # the first field after comm is field 3 (state)
    start = int(fields[_ENV_START_FIELD - first])
    end = int(fields[_ENV_START_FIELD + 1 - first])
    if not 0 < start <= end:
        raise ValueError(f"no environment bounds in {proc}/stat ({start}, {end})")
    return start, end


def _entries(block: bytes, prefixes: tuple[bytes, ...]) -> list[tuple[int, int]]:
    """``(offset, length)`` of each ``NAME=value`` entry whose name is wanted."""
    found = []
    offset = 0
    for entry in block.split(b"\0"):
        if entry.startswith(prefixes):
            found.append((offset, len(entry)))
        offset += len(entry) + 1
    return found


def scrub_exec_environ(names: Iterable[str]) -> bool:  # noqa: PLR0911 - one return per outcome
    """Overwrite ``NAME=value`` of each of ``names`` in the exec-time block with NULs.

    True when ``/proc/self/environ`` no longer shows any of them (also when it never
    did); False when it could not be done (another OS, no ``/proc``, a block that does
    not match memory), with the reason logged at debug level.
    """
    prefixes = tuple(f"{name}=".encode() for name in names)
    if not prefixes:
        return True
    if not sys.platform.startswith("linux"):
        log.debug("not on Linux: the exec-time environment block is left as it is")
        return False
    try:
        block = _read(f"{PROC_SELF}/environ")
        found = _entries(block, prefixes)
        if not found:
            return True
        import ctypes  # only now: most runs have nothing to erase

        start, end = environ_bounds()
        if len(block) != end - start or ctypes.string_at(start, len(block)) != block:
            log.debug("the environment block in memory does not match /proc/self/environ")
            return False
        for offset, length in found:
            ctypes.memset(start + offset, 0, length)
        left = _entries(_read(f"{PROC_SELF}/environ"), prefixes)
    except (OSError, ValueError, IndexError, ImportError, AttributeError) as exc:
        log.debug("cannot scrub the exec-time environment block: %s", type(exc).__name__)
        return False
    if left:
        log.debug("the exec-time environment block still shows %d entries", len(left))
        return False
    log.debug("erased %d entries from the exec-time environment block", len(found))
    return True
