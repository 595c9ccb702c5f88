"""Counters, their Prometheus exposition (``/metrics``, through
``prometheus_client``) and the monitored pids as JSON (``/status``).

The engine's parts add to plain ints in `Metrics` (the hot path stays free of
locks and objects); state owned elsewhere (monitored pids, the circusd
connection, kernel drops) is read through `Readings` when Prometheus scrapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson
from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ._core import DrainCounts
from .policy import HOLD_REASONS

logger = logging.getLogger("circus.watchdog")

PREFIX = "circus_watchdog_"

# Why a diagnostic capture (diagnostic_command) failed; each is exposed from the
# first scrape so that increase() sees the first failure.
CAPTURE_FAILURE_REASONS = ("timeout", "error", "skipped")


@dataclass
class Metrics:
    """Every counter the watchdog keeps; the engine's parts add to them."""

    datagrams: int = 0
    heartbeats: int = 0
    unknown: int = 0
    malformed: int = 0
    stale: int = 0
    kill_failures: int = 0
    would_kill: int = 0
    stalls: int = 0
    resyncs: int = 0
    captures: int = 0
    kills: Counter[str] = field(default_factory=Counter)
    kills_held: Counter[str] = field(default_factory=Counter)  # by reason
    capture_failures: Counter[str] = field(default_factory=Counter)

    def count_drain(self, counts: DrainCounts) -> None:
        """Add one drain's counts."""
        self.datagrams += counts.datagrams
        self.heartbeats += counts.heartbeats
        self.unknown += counts.unknown
        self.malformed += counts.malformed
        self.stale += counts.stale


class Readings(NamedTuple):
    """State owned by other parts, read when Prometheus scrapes."""

    monitored_pids: int
    connected: bool
    watchers: tuple[str, ...]  # monitored watchers: kills_total is 0 for each
    excluded_pids: int
    kernel_drops: int
    control_truncated: int


# (Metrics attribute, name without prefix and _total, help)
_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("datagrams", "datagrams", "datagrams received (UDP and Unix socket)"),
    ("heartbeats", "heartbeats", "heartbeats of a monitored pid"),
    ("unknown", "unknown_pid", "heartbeats of a pid that is not monitored"),
    ("malformed", "malformed", "datagrams that are no heartbeat"),
    ("stale", "stale", "heartbeats outside max_age"),
    ("kill_failures", "kill_failures", "kills circusd refused or did not carry out"),
    ("would_kill", "would_kill", "kills skipped by dry_run"),
    ("stalls", "stalls", "ticks that ran late: no kill on them"),
    ("resyncs", "resyncs", "pid lists re-read from circusd"),
    ("captures", "captures", "diagnostic_command captures that exited 0"),
)

# (Readings attribute, name without prefix and _total, help)
_READ_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("kernel_drops", "kernel_drops", "datagrams the kernel dropped on our sockets"),
    ("control_truncated", "control_truncated", "datagrams with control data cut"),
)
_READ_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("monitored_pids", "monitored_pids", "pids being watched"),
    ("connected", "circusd_connected", "1 while circusd answers"),
    ("excluded_pids", "excluded_pids", "pids of matched watchers left unwatched"),
)


class WatchdogCollector(Collector):
    """Builds the watchdog's metric families from `Metrics` and `Readings` at
    each scrape."""

    def __init__(
        self,
        metrics: Metrics,
        readings: Callable[[], Readings],
        info: Mapping[str, str],
    ) -> None:
        self._metrics = metrics
        self._readings = readings
        self._info = dict(info)

    def collect(self) -> Iterator[Metric]:
        """Every family, with the values of this instant."""
        metrics, now = self._metrics, self._readings()
        for attr, name, text in _COUNTERS:
            yield CounterMetricFamily(PREFIX + name, text, getattr(metrics, attr))
        for attr, name, text in _READ_COUNTERS:
            yield CounterMetricFamily(PREFIX + name, text, getattr(now, attr))
        for attr, name, text in _READ_GAUGES:
            yield GaugeMetricFamily(PREFIX + name, text, int(getattr(now, attr)))
        yield _labelled(
            "kills",
            "processes killed, by watcher",
            "watcher",
            metrics.kills,
            now.watchers,
        )
        yield _labelled(
            "kills_held",
            "kills held (a due kill not made), by reason (see policy)",
            "reason",
            metrics.kills_held,
            HOLD_REASONS,
        )
        yield _labelled(
            "capture_failures",
            "diagnostic captures that failed, by reason",
            "reason",
            metrics.capture_failures,
            CAPTURE_FAILURE_REASONS,
        )
        if self._info:
            yield InfoMetricFamily(
                PREFIX.rstrip("_"), "version, core and event loop", self._info
            )


def _labelled(
    name: str, text: str, label: str, counts: Counter[str], always: tuple[str, ...]
) -> CounterMetricFamily:
    """A counter by ``label``: every value in ``always`` is present, at 0 if
    never counted."""
    family = CounterMetricFamily(PREFIX + name, text, labels=[label])
    for value in sorted(set(always) | set(counts)):
        family.add_metric([value], counts[value])
    return family


def make_registry(
    metrics: Metrics, readings: Callable[[], Readings], info: Mapping[str, str]
) -> CollectorRegistry:
    """A registry with the watchdog's metrics and prometheus_client's process,
    platform and garbage-collector metrics."""
    registry = CollectorRegistry()
    registry.register(WatchdogCollector(metrics, readings, info))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


_MAX_REQUEST = 8192  # bytes of request line and headers we are willing to read
_REQUEST_TIMEOUT = 5.0  # seconds a client may take to send its request


def _header(head: bytes, name: bytes) -> str:
    """The value of header ``name`` (lower case) in a request head, or ''."""
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip().decode("latin-1")
    return ""


def _respond(
    head: bytes, registry: CollectorRegistry, status: Callable[[], Any]
) -> tuple[str, str, bytes]:
    """Status line, content type and body for one request head."""
    parts = head[: head.find(b"\r\n")].split()
    path = parts[1].split(b"?")[0] if len(parts) == 3 else b""
    if parts[:1] != [b"GET"]:
        return "405 Method Not Allowed", "text/plain", b"GET only\n"
    if path == b"/metrics":
        encoder, ctype = choose_encoder(_header(head, b"accept"))
        return "200 OK", ctype, encoder(registry)
    if path == b"/status":
        return "200 OK", "application/json", orjson.dumps(status())
    return "404 Not Found", "text/plain", b"try /metrics or /status\n"


async def serve_http(
    host: str,
    port: int,
    registry: CollectorRegistry,
    status: Callable[[], Any],
) -> asyncio.Server:
    """Serve ``GET /metrics`` and ``GET /status`` on ``host:port``.

    Raises OSError naming ``metrics_port`` when the address cannot be bound.
    """

    async def handle(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            head = await asyncio.wait_for(
                reader.readuntil(b"\r\n\r\n"), _REQUEST_TIMEOUT
            )
            try:
                code, ctype, body = _respond(head, registry, status)
            except Exception:
                logger.exception("metrics: %r failed", head[:80])
                code, ctype, body = "500 Internal Server Error", "text/plain", b""
            writer.write(
                f"HTTP/1.0 {code}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        # asyncio.TimeoutError, not the builtin: they differ on Python 3.10.
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            asyncio.TimeoutError,
            ConnectionError,
        ):
            pass  # a client that sent no whole request in time gets nothing
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    try:
        return await asyncio.start_server(handle, host, port, limit=_MAX_REQUEST)
    except OSError as exc:
        raise _bind_error(exc, host, port) from exc


def _bind_error(exc: OSError, host: str, port: int) -> OSError:
    """``exc`` as one line that names the option, the host and the port."""
    # asyncio folds the address into strerror; name the errno alone instead.
    # A resolver error (socket.gaierror) has a negative errno of its own.
    code = exc.errno
    reason = os.strerror(code) if code and code > 0 else str(exc.strerror or exc)
    # An address not on this host is metrics_host's fault, anything else the port's.
    option = "metrics_host" if code == errno.EADDRNOTAVAIL else "metrics_port"
    error = OSError(f"{option}: cannot listen on {host}:{port}: {reason}")
    error.errno = code  # kept for callers, left out of the one-line message
    return error
