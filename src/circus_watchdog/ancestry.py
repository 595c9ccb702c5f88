"""The monitored ancestor of a process, for ``notify_access = all``.

systemd's ``NotifyAccess=all`` accepts sd_notify messages from any process of
the service; circus has no cgroup per watcher, so a sender counts for the
nearest monitored pid on its parent chain, read from ``/proc/PID/stat``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

# /proc/PID/stat starts "PID (COMM) STATE PPID ...": PID has at most 10 digits
# and COMM at most 64 bytes, so 256 bytes always hold PPID.
_STAT_HEAD = 256


def parent_pid(pid: int) -> int:
    """The parent of ``pid`` as ``/proc`` says, or 0 (gone, no parent, no /proc)."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        head = os.read(fd, _STAT_HEAD)
    except OSError:
        return 0
    finally:
        os.close(fd)
    # COMM may hold any byte, ")" and spaces included; every later field is
    # a number or the one-letter state, so COMM ends at the last ")".
    end = head.rfind(b")")
    fields = head[end + 2 :].split(b" ", 2) if end > 0 else []
    if len(fields) < 3 or not fields[1].isdigit():
        return 0
    return int(fields[1])


def monitored_ancestor(
    pid: int, is_monitored: Callable[[int], bool], max_depth: int = 16
) -> int:
    """The nearest of ``pid``'s parent, grandparent, ... (at most ``max_depth``
    of them) for which ``is_monitored`` is true, else 0.  Never raises."""
    if pid <= 0:
        return 0
    for _ in range(max_depth):
        pid = parent_pid(pid)
        if pid <= 0:
            return 0
        if is_monitored(pid):
            return pid
    return 0
