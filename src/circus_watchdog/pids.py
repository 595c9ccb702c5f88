"""What a pid may be, and whether one still runs: shared by every module."""

from __future__ import annotations

import os
from typing import TypeGuard

#: pid_t is a signed 32-bit int on Linux and macOS.
PID_MAX = 2**31 - 1


def is_pid(value: object) -> TypeGuard[int]:
    """True for an int (not a bool) that can name a process: 1..PID_MAX."""
    return type(value) is int and 1 <= value <= PID_MAX


def stat_fields(pid: int, proc: str = "/proc") -> list[bytes] | None:
    """The fields of ``/proc/PID/stat`` after the command name (the state
    letter first, so field N of proc(5) is at index N - 3), or None."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as stat:
            data = stat.read()
    except OSError:
        return None
    # proc(5): the command name may hold any byte, ")" and spaces included;
    # every later field is a number or the state, so it ends at the last ")".
    end = data.rfind(b")")
    return data[end + 2 :].split() if end > 0 else None


def alive(pid: int) -> bool:
    """True while ``pid`` runs on this host; a zombie counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by another user
    # A zombie is dead, only not yet reaped by its parent. No /proc (macOS),
    # or it vanished meanwhile: trust kill(0).
    fields = stat_fields(pid)
    return not fields or fields[0] != b"Z"
