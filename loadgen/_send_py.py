"""Pure-Python twin of loadgen's compiled sender: one ``send``/``sendto`` per
datagram where the compiled one makes one ``sendmmsg(2)`` call per 64."""

from __future__ import annotations

import socket
from collections.abc import Sequence


def _sendto_all(
    sock: socket.socket,
    addr: tuple[str, int] | None,
    payloads: Sequence[bytes],
) -> int:
    sent = 0
    for payload in payloads:
        try:
            if addr is None:
                sock.send(payload, socket.MSG_DONTWAIT)
            else:
                sock.sendto(payload, socket.MSG_DONTWAIT, addr)
        except BlockingIOError:
            break
        except OSError:
            if sent:  # report what went out; the error recurs on the next call
                break
            raise
        sent += 1
    return sent


def send_heartbeats(
    sock: socket.socket,
    addr: tuple[str, int] | None,
    pids: Sequence[int],
    timestamp: float = 0.0,
) -> int:
    """Send one ``PID;TIMESTAMP`` datagram per pid (``sendmmsg`` when compiled).

    ``addr`` None sends on a connected socket.  Returns how many were sent
    before the socket buffer filled (never blocks).
    """
    return _sendto_all(sock, addr, [b"%d;%.3f" % (pid, timestamp) for pid in pids])


def send_datagrams(
    sock: socket.socket,
    addr: tuple[str, int] | None,
    payloads: Sequence[bytes],
) -> int:
    """Send each payload as one datagram; returns how many were sent."""
    return _sendto_all(sock, addr, payloads)
