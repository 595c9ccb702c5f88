"""loadgen's sender: the compiled twin (``sendmmsg``) or its pure-Python one,
chosen as the core is (`circus_watchdog._core.select`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from circus_watchdog._core import select

from . import _send_py

__all__ = ("compiled", "send_datagrams", "send_heartbeats")

if TYPE_CHECKING:
    from ._send_py import send_datagrams, send_heartbeats

    compiled = False
else:
    _impl, compiled = select(f"{__package__}._send_c", _send_py)
    send_datagrams = _impl.send_datagrams
    send_heartbeats = _impl.send_heartbeats
