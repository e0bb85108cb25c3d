"""Process checks through /proc (no psutil): whether a process is gone, and the live processes
of a parent or of a process group. Tests use them to prove that nothing is left running."""

from __future__ import annotations

import os


def _stat_fields(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def process_gone(pid: int) -> bool:
    """True when no process `pid` exists (a zombie counts as gone: it runs nothing)."""
    fields = _stat_fields(pid)
    return fields is None or fields[0] == "Z"


def _live(field: int, value: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(entry)
            if fields is not None and fields[0] != "Z" and int(fields[field]) == value:
                pids.append(int(entry))
    return pids


def child_pids(parent: int) -> list[int]:
    """Live (non-zombie) children of `parent`."""
    return _live(1, parent)


def group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group `pgid`."""
    return _live(2, pgid)
