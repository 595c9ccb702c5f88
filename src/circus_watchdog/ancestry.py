"""The monitored ancestor of a process, for ``notify_access = all``.

systemd's ``NotifyAccess=all`` accepts sd_notify messages from any process of
the service; circus has no cgroup per watcher, so a sender counts for the
nearest monitored pid on its parent chain, read from ``/proc/PID/stat``.
"""

from __future__ import annotations

from collections.abc import Callable

from .pids import stat_fields


def parent_pid(pid: int) -> int:
    """The parent of ``pid`` as ``/proc`` says, or 0 (gone, no parent, no /proc)."""
    fields = stat_fields(pid)
    if not fields or len(fields) < 2 or not fields[1].isdigit():
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
