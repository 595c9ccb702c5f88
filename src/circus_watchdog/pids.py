"""What a pid may be, and whether one still runs: shared by every module."""

from __future__ import annotations

import os
from typing import TypeGuard

#: pid_t is a signed 32-bit int on Linux and macOS.
PID_MAX = 2**31 - 1


def is_pid(value: object) -> TypeGuard[int]:
    """True for an int (not a bool) that can name a process: 1..PID_MAX."""
    return type(value) is int and 1 <= value <= PID_MAX


def alive(pid: int) -> bool:
    """True while ``pid`` runs on this host; a zombie counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by another user
    try:  # a zombie is dead, only not yet reaped by its parent
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS), or it vanished meanwhile: trust kill(0)
