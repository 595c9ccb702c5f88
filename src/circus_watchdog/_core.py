"""Chooses the compiled core or its pure-Python twin (one API, two bodies)."""

from __future__ import annotations

import os
import platform
import sys
from typing import TYPE_CHECKING

compiled: bool

if TYPE_CHECKING:
    from ._core_py import (
        DrainCounts,
        HeartbeatTable,
        notify_kind,
        parse_heartbeat,
        send_datagrams,
        send_heartbeats,
    )

    compiled = False
elif (
    os.environ.get("CIRCUS_WATCHDOG_NO_EXTENSIONS")
    or platform.python_implementation() != "CPython"
    or not sys.platform.startswith("linux")
):
    from ._core_py import (
        DrainCounts,
        HeartbeatTable,
        notify_kind,
        parse_heartbeat,
        send_datagrams,
        send_heartbeats,
    )

    compiled = False
else:
    try:
        from ._core_c import (
            DrainCounts,
            HeartbeatTable,
            parse_heartbeat,
            send_datagrams,
            send_heartbeats,
        )

        compiled = True
    except ImportError:
        from ._core_py import (
            DrainCounts,
            HeartbeatTable,
            parse_heartbeat,
            send_datagrams,
            send_heartbeats,
        )

        compiled = False

__all__ = (
    "DrainCounts",
    "HeartbeatTable",
    "compiled",
    "notify_kind",
    "parse_heartbeat",
    "send_datagrams",
    "send_heartbeats",
)
