"""Reading the heartbeat sockets (bound by ``sockets``): when, and into the table.

Two paths, chosen by what a datagram needs to be understood:

- **UDP heartbeats in the default format** are read by the core's reader
  thread (``HeartbeatTable.start_reader``, described in ``_core_py``'s
  docstring): no Python runs per wake-up and an idle fleet costs nothing.
  Sparse traffic is read on arrival, because a wake-up caused by a local
  sender is cheap (the kernel runs the reader where the sender just ran)
  where a timer wake-up from idle is not; a flood is drained, then slept on
  (``batch_delay`` up to 4 ms, by the traffic), as the C drain-then-sleep
  floor does.  A heartbeat reaches the table within 5 ms of its arrival.
  The thread's counts reach the metrics when `Receiver.collect` runs: at
  every tick and every scrape.
- **A custom ``msg_regex``** (the pattern is Python's) **and the sd_notify Unix
  socket** (``notify_access = all`` asks Python to find a sender's ancestor)
  are read on the event loop by a `Coalescer`: on readability while traffic
  is sparse (a quiet fleet costs no timer, a lone heartbeat is read at once),
  and on a timer once readability wake-ups keep coming closer together than
  ``SPARSE_DELAY`` (``TO_TIMER`` in a row).  The timer's interval starts at
  ``SPARSE_DELAY`` (4 ms), halves (down to ``batch_delay``) while reads find
  more than ``SHRINK_ABOVE`` datagrams and doubles back (up to
  ``SPARSE_DELAY``) while they find fewer than ``GROW_BELOW``.  A read that
  hit ``budget`` reads again at once; after ``TO_READABILITY`` empty reads in
  a row the reader goes back to readability.  A heartbeat waits at most
  ``SPARSE_DELAY`` (or ``batch_delay`` if larger): within 5 ms of its
  arrival.  ``batch_delay = 0`` reads on every wake-up.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import socket
import time
from collections.abc import Callable

from ._core import DrainCounts, HeartbeatTable
from ._core_py import LONGEST_WAIT
from .ancestry import monitored_ancestor
from .config import Config
from .formats import apply_regex
from .metrics import Metrics
from .sockets import (
    bind_udp,
    bind_unix,
    inherited_unix_socket,
    is_socket,
    size_rcvbuf,
)

logger = logging.getLogger("circus.watchdog")

#: Readability wake-ups in a row, each within SPARSE_DELAY of the one before,
#: that move a reader to its timer; and empty timer reads in a row that move
#: it back.  Both want a trend, not one close pair or one quiet interval.
TO_TIMER = 3
TO_READABILITY = 3
#: The timer's longest interval (seconds), the reader thread's longest sleep:
#: a heartbeat reaches the table within 5 ms of its arrival, with 1 ms to
#: spare for the loop's other work.
SPARSE_DELAY = LONGEST_WAIT
#: Datagrams per timer read under which the interval doubles (a wake-up costs
#: about as much as 16 datagrams) and over which it halves.  The gap between
#: them keeps a steady rate from flipping it at every read.
GROW_BELOW = 16
SHRINK_ABOVE = 64


class Coalescer:
    """Reads one socket: on readability while traffic is sparse, on a timer
    whose interval follows the traffic while it is not (see the module).

    ``read()`` drains what is queued (at most ``budget`` datagrams) and returns
    how many datagrams it read.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fd: int,
        read: Callable[[], int],
        *,
        delay: float,
        budget: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._loop = loop
        self._fd = fd
        self._read = read
        self._delay = delay  # the shortest interval (batch_delay); 0: no timer
        self._longest = max(delay, SPARSE_DELAY)
        self._interval = self._longest
        self._budget = budget
        self._clock = clock
        self._timer: asyncio.Handle | None = None
        self._last_ready = -math.inf  # the last readability wake-up
        self._streak = 0  # close wake-ups, or empty timer reads, in a row
        self.wakeups = 0  # reads so far (readability and timer)

    @property
    def interval(self) -> float | None:
        """The timer's interval, or None while reading on readability."""
        return None if self._timer is None else self._interval

    def start(self) -> None:
        """Wait for the first datagram."""
        self._loop.add_reader(self._fd, self._on_readable)

    def stop(self) -> None:
        """Stop reading (the socket stays open)."""
        self._loop.remove_reader(self._fd)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_readable(self) -> None:
        self.wakeups += 1
        now = self._clock()
        close = now - self._last_ready < self._longest
        self._last_ready = now
        self._streak = self._streak + 1 if close else 0
        if self._read() and self._delay and self._streak >= TO_TIMER:
            self._streak = 0
            self._loop.remove_reader(self._fd)
            self._interval = self._longest
            self._timer = self._loop.call_later(self._interval, self._on_timer)

    def _on_timer(self) -> None:
        self.wakeups += 1
        n = self._read()
        self._streak = 0 if n else self._streak + 1
        if n >= self._budget:  # more is queued: read again after other work
            self._timer = self._loop.call_soon(self._on_timer)
            return
        if self._streak >= TO_READABILITY:  # the traffic is gone
            self._timer = None
            self._streak = 0
            self._last_ready = -math.inf
            self._loop.add_reader(self._fd, self._on_readable)
            return
        if n > SHRINK_ABOVE:
            self._interval = max(self._interval / 2, self._delay)
        elif n < GROW_BELOW:
            self._interval = min(self._interval * 2, self._longest)
        self._timer = self._loop.call_later(self._interval, self._on_timer)


class Receiver:
    """Owns the heartbeat sockets and feeds what they read into the table."""

    def __init__(
        self,
        config: Config,
        table: HeartbeatTable,
        metrics: Metrics,
        *,
        on_unknown: Callable[[], None] = lambda: None,
    ) -> None:
        self.config = config
        self.table = table
        self.metrics = metrics
        self._on_unknown = on_unknown  # a read found a pid that is not monitored
        self._pattern = config.msg_pattern
        self._udp: socket.socket | None = None
        self._unix: socket.socket | None = None
        self._unix_bound = False  # we bound it (not inherited from circusd)
        self._readers: list[Coalescer] = []  # event-loop readers
        self._errors = 0  # the reader thread's read errors, as last logged
        # notify_access = all: a sender counts for its nearest monitored ancestor.
        self._resolve = (
            functools.partial(monitored_ancestor, is_monitored=table.__contains__)
            if config.notify_access == "all"
            else None
        )

    @property
    def address(self) -> tuple[str, int] | None:
        """The UDP socket's bound (ip, port), or None when UDP is off."""
        if self._udp is None:
            return None
        host, port = self._udp.getsockname()[:2]
        return host, port

    def listening(self) -> str:
        """Where heartbeats are read, for the start-up line."""
        out = []
        if self.address is not None:
            out.append(f"udp {self.address[0]}:{self.address[1]}")
        if self.config.unix_socket is not None:
            out.append(f"unix {self.config.unix_socket}")
        return " and ".join(out)

    @property
    def wakeups(self) -> int:
        """Reads made so far, on every socket and by the reader thread."""
        loop_reads = sum(reader.wakeups for reader in self._readers)
        return loop_reads + self.table.reader_wakeups

    def open(self) -> None:
        """Bind the sockets; OSError (naming the option) if one cannot be."""
        config = self.config
        if config.port:
            self._udp = bind_udp(config)
        if config.unix_socket is not None:
            try:
                self._unix = inherited_unix_socket(config.unix_socket)
                if self._unix is not None:  # circusd's [socket:NAME]
                    size_rcvbuf(self._unix, config.rcvbuf)
                else:
                    self._unix = bind_unix(config)
                    self._unix_bound = True
            except OSError:
                self.close()
                raise

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start reading: the default format on the core's thread, the rest on
        ``loop``."""
        config = self.config
        udp = self._udp
        if udp is not None and self._pattern is None:
            self.table.start_reader(
                udp,
                budget=config.budget,
                flood_delay=config.batch_delay,
                max_age=config.max_age or 0.0,
            )
            udp = None  # not the loop's
        for sock, read in ((udp, self._read_regex), (self._unix, self._read_notify)):
            if sock is not None:
                reader = Coalescer(
                    loop,
                    sock.fileno(),
                    read,
                    delay=self.config.batch_delay,
                    budget=self.config.budget,
                )
                reader.start()
                self._readers.append(reader)

    def collect(self) -> None:
        """Move what the reader thread counted into the metrics (and tell sync
        of unknown pids); log its read errors.  Cheap: a lock and six ints."""
        self._count(self.table.reader_counts())
        errors = self.table.reader_errors
        if errors > self._errors:
            logger.error(
                "reading the heartbeat socket failed %d time(s) since the last tick",
                errors - self._errors,
            )
            self._errors = errors

    def close(self) -> None:
        """Stop reading and close the sockets (unlinking our Unix socket)."""
        self.table.stop_reader()  # before the socket closes under it
        self.collect()
        for reader in self._readers:
            reader.stop()
        self._readers.clear()
        for sock in (self._udp, self._unix):
            if sock is not None:
                sock.close()
        path = self.config.unix_socket
        if self._unix_bound and path and is_socket(path):
            os.unlink(path)
        self._udp = self._unix = None
        self._unix_bound = False

    def _read_regex(self) -> int:
        assert self._udp is not None and self._pattern is not None
        try:
            payloads, oversized = self.table.drain_raw(self._udp, self.config.budget)
        except OSError as exc:
            logger.error("reading the heartbeat socket failed: %s", exc)
            return 0
        max_age = self.config.max_age
        counts = apply_regex(
            self._pattern,
            self.table,
            payloads,
            time.monotonic(),
            max_age or 0.0,
            time.time() if max_age else 0.0,
        )
        self.metrics.datagrams += oversized
        self.metrics.malformed += oversized
        return self._count(counts) + oversized

    def _read_notify(self) -> int:
        assert self._unix is not None
        try:
            counts = self.table.drain_notify(
                self._unix, time.monotonic(), self.config.budget, self._resolve
            )
        except OSError as exc:
            logger.error("reading unix_socket failed: %s", exc)
            return 0
        return self._count(counts)

    def _count(self, counts: DrainCounts) -> int:
        # One read's counts into the metrics; its datagrams.
        self.metrics.count_drain(counts)
        if counts.unknown:
            self._on_unknown()
        return counts.datagrams
