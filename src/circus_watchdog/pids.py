"""What a pid may be: shared by every module (whether one runs: ``procfs``)."""

from __future__ import annotations

from typing import TypeGuard

#: pid_t is a signed 32-bit int on Linux and macOS.
PID_MAX = 2**31 - 1


def is_pid(value: object) -> TypeGuard[int]:
    """True for an int (not a bool) that can name a process: 1..PID_MAX."""
    return type(value) is int and 1 <= value <= PID_MAX
