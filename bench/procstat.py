"""CPU time and resident memory of a process tree, read from ``/proc`` (Linux only, stdlib only).

A server is measured as its whole tree (gunicorn master + workers, nginx master + worker, uvicorn parent +
children): :func:`tree_pids` walks ``/proc/*/stat`` once, then :func:`cpu_seconds` sums ``utime + stime``
and :func:`rss_bytes` sums resident pages (``/proc/<pid>/statm``'s second field, the same number as
``VmRSS`` in ``/proc/<pid>/status``). Processes that exit between the walk and the read are skipped.
"""
from __future__ import annotations

import os
from collections.abc import Iterable

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (field 3 onwards)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return data[data.rindex(b")") + 2:].decode().split()


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants that are alive now (``[]`` if root is gone)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                ppid = int(_stat_fields(int(name))[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(name))
    if not os.path.exists(f"/proc/{root}"):
        return []
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds used so far by these processes (all their threads)."""
    ticks = 0
    for pid in pids:
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])   # utime, stime (fields 14 and 15 of the whole line)
    return ticks / CLOCK_TICKS


def rss_bytes(pids: Iterable[int]) -> int:
    """Sum of the resident set sizes of these processes, in bytes."""
    pages = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                pages += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return pages * PAGE_SIZE
