"""Adopt the sd_notify socket from circusd instead of binding it.

A client such as Python's ``sdnotify`` connects to ``NOTIFY_SOCKET`` once, when
it starts, and silently gives up if nothing is bound there yet. circusd starts
its watchers right after the plugins, before a plugin has had time to bind, so
such a client would stay silent until killed. circusd binds a ``[socket:NAME]``
(``family = AF_UNIX``, ``type = SOCK_DGRAM``, ``path = ...``) before it starts
any process, and with ``use_sockets = True`` the plugin inherits it: the
watchdog then reads that socket rather than binding its own (and leaves the
path to circusd, which removes it when it exits).
"""

from __future__ import annotations

import os
import socket
import stat

__all__ = ["inherited_unix_socket"]

FD_DIRS = ("/proc/self/fd", "/dev/fd")  # Linux, then macOS and the BSDs


def inherited_unix_socket(path: str) -> socket.socket | None:
    """The inherited ``AF_UNIX`` datagram socket bound to ``path``, or None.

    The socket returned is non-blocking, passes credentials (``SO_PASSCRED``
    where there is one) and is not inherited further.
    """
    for fd in _open_fds():
        sock = _socket_at(fd)
        if sock is None:
            continue
        if _is_bound_to(sock, path):
            sock.set_inheritable(False)
            sock.setblocking(False)
            if hasattr(socket, "SO_PASSCRED"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            return sock
        sock.detach()  # not ours to close
    return None


def _open_fds() -> list[int]:
    for fd_dir in FD_DIRS:
        try:
            names = os.listdir(fd_dir)
        except OSError:
            continue
        return sorted(int(name) for name in names if name.isdigit() and int(name) > 2)
    return []


def _socket_at(fd: int) -> socket.socket | None:
    try:
        # Inherited descriptors lack close-on-exec, which Python sets on its own.
        if not stat.S_ISSOCK(os.fstat(fd).st_mode) or not os.get_inheritable(fd):
            return None
        return socket.socket(fileno=fd)  # family and type read from the fd
    except OSError:
        return None  # closed meanwhile (listdir's own fd) or not inspectable


def _is_bound_to(sock: socket.socket, path: str) -> bool:
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_DGRAM:
        return False
    try:
        name = sock.getsockname()
    except OSError:
        return False
    if isinstance(name, bytes):  # the abstract namespace: b"\0name"
        return name.startswith(b"\0") and "@" + os.fsdecode(name[1:]) == path
    if not name:
        return False
    return bool(name == path or os.path.realpath(name) == os.path.realpath(path))
