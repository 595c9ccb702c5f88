"""The monitored ancestor of a process, for ``notify_access = all``.

systemd's ``NotifyAccess=all`` accepts sd_notify messages from any process of
the service; circus has no cgroup per watcher, so a sender counts for the
nearest monitored pid on its parent chain (each parent read by
``procfs.parent_pid``).
"""

from __future__ import annotations

from collections.abc import Callable

from .procfs import parent_pid


def monitored_ancestor(
    pid: int, is_monitored: Callable[[int], bool], max_depth: int = 16
) -> int:
    """The nearest of ``pid``'s parent, grandparent, ... (at most ``max_depth``
    of them) for which ``is_monitored`` is true, else 0.  Never raises."""
    if pid <= 0:
        return 0
    for _ in range(max_depth):
        parent = parent_pid(pid)
        if not parent:  # gone, hidden, or the top of the chain
            return 0
        if is_monitored(parent):
            return parent
        pid = parent
    return 0
