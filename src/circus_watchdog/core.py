"""Public home of the heartbeat core: ``from circus_watchdog.core import ...``."""

from ._core import (
    DrainCounts,
    HeartbeatTable,
    compiled,
    heartbeat_timestamp,
    notify_kind,
    parse_heartbeat,
    send_datagrams,
    send_heartbeats,
)

__all__ = (
    "DrainCounts",
    "HeartbeatTable",
    "compiled",
    "heartbeat_timestamp",
    "notify_kind",
    "parse_heartbeat",
    "send_datagrams",
    "send_heartbeats",
)
