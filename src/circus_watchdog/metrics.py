"""Counters, and the HTTP endpoint serving them as Prometheus text (``/metrics``)
and the monitored pids as JSON (``/status``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from ._core import DrainCounts

logger = logging.getLogger("circus.watchdog")

# (attribute, metric name, type, help); kills are labelled by watcher below.
_SERIES: tuple[tuple[str, str, str, str], ...] = (
    ("datagrams", "datagrams_total", "counter", "UDP datagrams received"),
    ("heartbeats", "heartbeats_total", "counter", "heartbeats of a monitored pid"),
    ("unknown", "unknown_pid_total", "counter", "heartbeats of an unmonitored pid"),
    ("malformed", "malformed_total", "counter", "datagrams that are no heartbeat"),
    ("stale", "stale_total", "counter", "heartbeats outside max_age"),
    ("kernel_drops", "kernel_drops_total", "counter", "datagrams the kernel dropped"),
    ("kill_failures", "kill_failures_total", "counter", "kills circusd refused"),
    ("would_kill", "would_kill_total", "counter", "kills skipped by --dry-run"),
    ("kills_held", "kills_held_total", "counter", "kills held by the storm guard"),
    ("stalls", "stalls_total", "counter", "ticks that ran late: no kill on them"),
    ("resyncs", "resyncs_total", "counter", "pid lists re-read from circusd"),
    ("monitored_pids", "monitored_pids", "gauge", "pids being watched"),
    ("connected", "circusd_connected", "gauge", "1 while circusd answers"),
)


@dataclass
class Metrics:
    """Every counter the watchdog keeps; the engine is the only writer."""

    datagrams: int = 0
    heartbeats: int = 0
    unknown: int = 0
    malformed: int = 0
    stale: int = 0
    kernel_drops: int = 0
    kill_failures: int = 0
    would_kill: int = 0
    kills_held: int = 0
    stalls: int = 0
    resyncs: int = 0
    monitored_pids: int = 0
    connected: int = 0
    kills: Counter[str] = field(default_factory=Counter)
    info: dict[str, str] = field(default_factory=dict)

    def count_drain(self, counts: DrainCounts) -> None:
        """Add one drain's counts."""
        self.datagrams += counts.datagrams
        self.heartbeats += counts.heartbeats
        self.unknown += counts.unknown
        self.malformed += counts.malformed
        self.stale += counts.stale

    def render(self) -> str:
        """The Prometheus text exposition of every metric."""
        lines = []
        for attr, name, kind, text in _SERIES:
            lines += [
                f"# HELP circus_watchdog_{name} {text}",
                f"# TYPE circus_watchdog_{name} {kind}",
                f"circus_watchdog_{name} {getattr(self, attr)}",
            ]
        lines += [
            "# HELP circus_watchdog_kills_total processes killed, by watcher",
            "# TYPE circus_watchdog_kills_total counter",
        ]
        lines += [
            f'circus_watchdog_kills_total{{watcher="{_label(w)}"}} {n}'
            for w, n in sorted(self.kills.items())
        ]
        if self.info:
            labels = ",".join(
                f'{k}="{_label(v)}"' for k, v in sorted(self.info.items())
            )
            lines += [
                "# HELP circus_watchdog_info version, core and event loop",
                "# TYPE circus_watchdog_info gauge",
                f"circus_watchdog_info{{{labels}}} 1",
            ]
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


_MAX_REQUEST = 8192  # bytes of request line and headers we are willing to read
_REQUEST_TIMEOUT = 5.0  # seconds a client may take to send its request


async def serve_http(
    host: str,
    port: int,
    metrics: Callable[[], str],
    status: Callable[[], Any],
) -> asyncio.Server:
    """Serve ``GET /metrics`` and ``GET /status`` on ``host:port``."""

    async def handle(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            head = await asyncio.wait_for(
                reader.readuntil(b"\r\n\r\n"), _REQUEST_TIMEOUT
            )
            parts = head[: head.find(b"\r\n")].split()
            path = parts[1].split(b"?")[0] if len(parts) == 3 else b""
            if parts[:1] != [b"GET"]:
                code, ctype, body = (
                    "405 Method Not Allowed",
                    "text/plain",
                    b"GET only\n",
                )
            elif path == b"/metrics":
                code, ctype = "200 OK", "text/plain; version=0.0.4"
                body = metrics().encode()
            elif path == b"/status":
                code, ctype, body = "200 OK", "application/json", orjson.dumps(status())
            else:
                code, ctype, body = "404 Not Found", "text/plain", b"try /metrics\n"
            writer.write(
                f"HTTP/1.0 {code}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass  # a client that sent no whole request gets nothing
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    return await asyncio.start_server(handle, host, port, limit=_MAX_REQUEST)
