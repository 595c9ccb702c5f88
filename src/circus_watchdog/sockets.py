"""The heartbeat sockets: binding, buffers, and adopting circusd's socket.

The UDP socket is bound on ``ip``:``port`` with ``SO_RXQ_OVFL`` set, so each
datagram read after a drop carries the kernel's drop count.  Every socket asks
for an ``rcvbuf``-byte receive buffer, forcing past ``net.core.rmem_max``
where allowed (``SO_RCVBUFFORCE`` needs ``CAP_NET_ADMIN``), and warns when the
kernel grants less.

The sd_notify socket (``unix_socket``) is adopted from circusd when it can
be.  A client such as Python's ``sdnotify`` connects to ``NOTIFY_SOCKET``
once, when it starts, and silently gives up if nothing is bound there yet.
circusd starts its watchers right after the plugins, before a plugin has had
time to bind, so such a client would stay silent until killed.  circusd binds
a ``[socket:NAME]`` (``family = AF_UNIX``, ``type = SOCK_DGRAM``, ``path =
...``) before it starts any process, and with ``use_sockets = True`` the
plugin inherits it: the watchdog then reads that socket rather than binding
its own (and leaves the path to circusd, which removes it when it exits).
Otherwise it binds the path itself (``@name``: the abstract namespace),
replacing a socket left by a previous run but never another kind of file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import sys
from typing import TYPE_CHECKING

from .procfs import own_fds

if TYPE_CHECKING:
    from .config import Config

__all__ = [
    "SCM_CREDENTIALS",
    "SO_RCVBUFFORCE",
    "SO_RXQ_OVFL",
    "bind_udp",
    "bind_unix",
    "inherited_unix_socket",
    "is_socket",
    "set_rcvbuf",
    "size_rcvbuf",
]

logger = logging.getLogger("circus.watchdog")

# socket(7), Linux (Python's socket module names none of these): report the
# socket's cumulative drop count with each datagram read after a drop; set a
# buffer past net.core.rmem_max; unix(7): the sender's credentials.
SO_RXQ_OVFL = getattr(socket, "SO_RXQ_OVFL", 40)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SCM_CREDENTIALS = getattr(socket, "SCM_CREDENTIALS", 2)


def is_socket(path: str) -> bool:
    """True if ``path`` names a Unix socket."""
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def set_rcvbuf(sock: socket.socket, want: int) -> int:
    """Ask for a ``want``-byte receive buffer (forcing past rmem_max where
    allowed); return the bytes granted."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, want)
    # Linux reports twice what it grants (the rest is bookkeeping).
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2 < want:
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError):  # needs CAP_NET_ADMIN
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, want)
    return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2)


def size_rcvbuf(sock: socket.socket, want: int) -> None:
    """``set_rcvbuf``, with a warning when the kernel grants less."""
    got = set_rcvbuf(sock, want)
    if got < want:
        logger.warning(
            "rcvbuf: asked for %d bytes, the kernel granted %d; raise "
            "net.core.rmem_max (sysctl -w net.core.rmem_max=%d) or run with "
            "CAP_NET_ADMIN, or heartbeats may be dropped under load",
            want,
            got,
            want,
        )


def bind_udp(config: Config) -> socket.socket:
    """The UDP heartbeat socket on ``ip``:``port``; OSError naming them."""
    family = socket.AF_INET6 if ":" in config.ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        size_rcvbuf(sock, config.rcvbuf)
        sock.bind((config.ip, config.port))
    except OSError as exc:
        sock.close()
        raise OSError(
            exc.errno,
            f"cannot bind the heartbeat socket to ip {config.ip} "
            f"port {config.port}: {exc.strerror}",
        ) from None
    sock.setblocking(False)
    with contextlib.suppress(OSError):  # Linux only: drops are then unseen
        sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
    return sock


def bind_unix(config: Config) -> socket.socket:
    """The sd_notify socket at ``unix_socket``; OSError naming it."""
    path = config.unix_socket
    assert path is not None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        size_rcvbuf(sock, config.rcvbuf)
        if not path.startswith("@") and is_socket(path):
            os.unlink(path)  # left by a previous run; never unlink a file
        sock.bind(address)
        if not path.startswith("@"):
            os.chmod(path, 0o666)  # watchers may run as other users
    except OSError as exc:
        sock.close()
        raise OSError(
            exc.errno, f"cannot bind unix_socket {path}: {exc.strerror}"
        ) from None
    sock.setblocking(False)
    return sock


def inherited_unix_socket(path: str) -> socket.socket | None:
    """The inherited ``AF_UNIX`` datagram socket bound to ``path``, or None.

    The socket returned is non-blocking, passes credentials (``SO_PASSCRED``
    where there is one) and is not inherited further.
    """
    for fd in own_fds() or []:
        if fd <= 2:
            continue
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
