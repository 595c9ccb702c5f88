"""Pure-Python twin of the compiled core: same API, same rules, same counters.

This module is also the typing source of truth for ``_core_c.pyx``.

The table is a pid -> slot dict plus parallel slot arrays, and a hashed timing
wheel whose buckets are arrays of slot ids (a slot knows its bucket and index,
so removal swaps the bucket's last slot into its place).  A beat only moves
``last_seen`` forward;
the slot stays in the bucket it was filed in.  When that bucket comes due, the
slot is checked against its real deadline and either expires or is re-filed in
the bucket of its new deadline.  So a tick costs the slots filed in it, not the
table size, and a beat never touches the wheel.

The reader thread (``start_reader``) reads one UDP socket of heartbeats in the
default format, so that no Python runs on the event loop per wake-up (the
compiled twin's thread never takes the GIL).  It blocks until a datagram is
queued, reads what is queued (up to ``budget``), applies it under the table's
lock, and counts it for ``reader_counts``.  Sparse traffic is read on
arrival; a flood (FLOOD_BATCH below) is drained, then slept on, for as long
as FLOOD_READ datagrams take to come, between ``flood_delay`` and
LONGEST_WAIT.  One lock guards the table: every public method takes it, and
the thread holds it only to apply a batch it has already read.
"""

from __future__ import annotations

import array
import collections
import math
import os
import re
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import update_wrapper
from typing import Any, Concatenate, NamedTuple, ParamSpec, TypeVar

from .pids import PID_MAX
from .sockets import SCM_CREDENTIALS, SO_RXQ_OVFL

MAX_DATAGRAM = 1024  # bytes; longer heartbeats are malformed
_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid
#: Passed descriptors (SCM_RIGHTS) that fit the control buffer; the kernel
#: closes the rest and sets MSG_CTRUNC.  Each is closed as soon as it is read.
_MAX_PASSED_FDS = 32
_CONTROL_SIZE = (
    socket.CMSG_SPACE(4)
    + socket.CMSG_SPACE(_UCRED.size)
    + socket.CMSG_SPACE(4 * _MAX_PASSED_FDS)
    if hasattr(socket, "CMSG_SPACE")
    else 0
)
# Linux: close-on-exec on every received descriptor, so none leaks into a child.
_RECV_FLAGS = socket.MSG_DONTWAIT | getattr(socket, "MSG_CMSG_CLOEXEC", 0)
#: Traffic that brings, on average over the reader's last reads, at least
#: FLOOD_BATCH datagrams per ``flood_delay`` is a flood: the thread sleeps
#: after each read (drain, then sleep) for as long as FLOOD_READ datagrams
#: take to come at that average, at least ``flood_delay`` and at most
#: LONGEST_WAIT (or ``flood_delay`` if longer), so a read finds a batch and a
#: heartbeat reaches the table within 5 ms of its arrival.  Sparser traffic
#: is read on arrival: there a wake-up by a local sender costs less than a
#: timer's (see receiver.py).
FLOOD_BATCH = 4
FLOOD_READ = 16
LONGEST_WAIT = 0.004
#: Weight 1/FLOOD_SMOOTHING of the newest read in that average, so that two
#: datagrams that happen to come close together do not make a flood.
FLOOD_SMOOTHING = 8
#: Seconds the reader thread pauses after a read error before reading again.
ERROR_PAUSE = 0.05

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _locked(
    method: Callable[Concatenate[Any, _P], _R],
) -> Callable[Concatenate[Any, _P], _R]:
    # Every public method of the table holds its lock (the reader thread's
    # too): re-entrant, since drain on a descriptor calls drain on a socket
    # and drain_notify's resolve may ask the table.
    def locked(self: Any, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self._lock:
            return method(self, *args, **kwargs)

    update_wrapper(locked, method)
    return locked


class DrainCounts(NamedTuple):
    """What one ``drain`` call read: every datagram lands in exactly one of the
    other fields (``drain_notify`` also reads sd_notify messages that are no
    heartbeat, counted in ``datagrams`` only)."""

    datagrams: int
    heartbeats: int
    unknown: int
    malformed: int
    stale: int = 0  # timestamp missing or off by more than max_age


def parse_heartbeat(data: bytes) -> int | None:
    """Return the pid of a default-format ``PID;TIMESTAMP`` heartbeat, else None.

    The rules are those of the original plugin's ``^(?P<pid>.*);(?P<timestamp>.*)$``
    on ``data.decode()``, narrowed to pids that can name a process: the pid is
    everything before the last ``;`` and must be canonical decimal in
    1..2**31-1; one trailing newline is allowed; at most 1024 bytes; the whole
    datagram must be valid UTF-8.
    """
    if type(data) is not bytes:
        data = bytes(data)
    n = len(data)
    if n == 0 or n > MAX_DATAGRAM:
        return None
    if data[n - 1] == 0x0A:  # `$` matches before one final newline
        data = data[: n - 1]
    if b"\n" in data:  # `.` never matches a newline
        return None
    semi = data.rfind(b";")  # `.*` is greedy: the pid ends at the last `;`
    if semi <= 0 or semi > 10 or data[0] == 0x30:  # empty, > 10 digits, 0-led
        return None
    head = data[:semi]
    if not (head.isascii() and head.isdigit()):
        return None
    pid = int(head)
    if pid > PID_MAX:
        return None
    tail = data[semi + 1 :]
    if not tail.isascii():
        try:
            tail.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return pid


_TIMESTAMP = re.compile(rb"[0-9]*\.?[0-9]*")


def heartbeat_timestamp(data: bytes) -> float | None:
    """The numeric timestamp of a default-format heartbeat, else None.

    The text after the last ``;``, less a final newline and then a final
    carriage return, must be digits with at most one ``.``, at most 32 bytes.
    """
    if parse_heartbeat(data) is None:
        return None
    text = bytes(data)
    text = text[text.rfind(b";") + 1 :]
    text = text.removesuffix(b"\n").removesuffix(b"\r")
    if not 0 < len(text) <= 32 or _TIMESTAMP.fullmatch(text) is None:
        return None
    if text == b".":
        return None
    return float(text)


def notify_kind(data: bytes) -> int:
    """1 for an sd_notify message with ``WATCHDOG=1``, 0 for another sd_notify
    message, -1 for anything else.

    sd_notify messages are newline-separated ``NAME=VALUE`` assignments
    (sd_notify(3)); empty lines are skipped.
    """
    lines = [line for line in bytes(data).split(b"\n") if line]
    if not lines or any(line.find(b"=") <= 0 for line in lines):
        return -1
    return 1 if b"WATCHDOG=1" in lines else 0


def _check_args(timeout: float, tick: float) -> tuple[float, float]:
    try:
        timeout = float(timeout)
    except (TypeError, ValueError):
        raise ValueError(
            f"timeout must be a number of seconds, got {timeout!r}"
        ) from None
    try:
        tick = float(tick)
    except (TypeError, ValueError):
        raise ValueError(f"tick must be a number of seconds, got {tick!r}") from None
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    if not (math.isfinite(tick) and tick > 0):
        raise ValueError(f"tick must be > 0 seconds, got {tick!r}")
    if tick > timeout:
        raise ValueError(f"tick must be <= timeout ({timeout!r}), got {tick!r}")
    return timeout, tick


def _check_seconds(name: str, value: float) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{name} must be > 0 seconds, got {value!r}")
    return seconds


def _wheel_size(timeout: float, tick: float) -> int:
    # Enough buckets that a deadline (at most `timeout` ahead) never wraps
    # onto the bucket being processed; a power of two so `& mask` picks one.
    need = math.ceil(timeout / tick) + 2
    return 1 << max(need - 1, 1).bit_length()


def _check_reader_args(
    budget: int, flood_delay: float, max_age: float
) -> tuple[int, float, float]:
    if type(budget) is not int or budget < 1:
        raise ValueError(f"budget must be an int >= 1, got {budget!r}")
    if not (math.isfinite(flood_delay) and flood_delay >= 0):
        raise ValueError(f"flood_delay must be >= 0 seconds, got {flood_delay!r}")
    if not (math.isfinite(max_age) and max_age >= 0):
        raise ValueError(f"max_age must be >= 0 seconds, got {max_age!r}")
    return budget, float(flood_delay), float(max_age)


def _check_pid(pid: int) -> int:
    if not 1 <= pid <= PID_MAX:
        raise ValueError(f"pid must be in 1..{PID_MAX}, got {pid!r}")
    return pid


class HeartbeatTable:
    """Last heartbeat of every monitored pid, with a timing wheel for expiry."""

    def __init__(self, timeout: float, tick: float) -> None:
        self._timeout, self._tick = _check_args(timeout, tick)
        size = _wheel_size(self._timeout, self._tick)
        self._mask = size - 1
        self._buckets: list[list[int]] = [[] for _ in range(size)]
        self._index: dict[int, int] = {}
        self._pid: list[int] = []
        self._last: list[float] = []
        self._limit: list[float] = []  # grace until a beat, then the timeout
        self._bucket: list[int] = []  # the bucket holding each slot
        self._pos: list[int] = []  # the slot's index in that bucket
        self._wid: list[int] = []
        self._free: list[int] = []
        self._watchers: list[str] = []
        self._watcher_ids: dict[str, int] = {}
        self._wlimit: list[float] = []  # timeout of each watcher id
        self._next_tick = 0  # first tick not yet fully processed
        self._started = False
        self._buf = bytearray(MAX_DATAGRAM + 1)
        self._drops = 0
        self._ctrunc = 0
        self._sender = 0
        self._lock = threading.RLock()
        self._reader: _Reader | None = None
        self._read = [0, 0, 0, 0, 0]  # the reader's DrainCounts, not yet taken
        self._wakeups = 0
        self._errors = 0

    @property
    @_locked
    def timeout(self) -> float:
        """Seconds of silence after which a pid expires."""
        return self._timeout

    @property
    @_locked
    def tick(self) -> float:
        """Granularity of the timing wheel, in seconds."""
        return self._tick

    @_locked
    def __len__(self) -> int:
        return len(self._index)

    @_locked
    def __contains__(self, pid: object) -> bool:
        return pid in self._index

    @_locked
    def pids(self) -> list[int]:
        """The monitored pids, in no particular order."""
        return list(self._index)

    @_locked
    def watcher_counts(self) -> dict[str, int]:
        """How many pids each watcher has in the table (watchers with none left out)."""
        counts = collections.Counter(self._wid[slot] for slot in self._index.values())
        return {self._watchers[wid]: n for wid, n in sorted(counts.items())}

    @_locked
    def watcher_of(self, pid: int) -> str:
        """Name of the watcher that owns ``pid``; KeyError if not monitored."""
        return self._watchers[self._wid[self._index[pid]]]

    @_locked
    def last_seen(self, pid: int) -> float:
        """Time of the last heartbeat (or add) of ``pid``; KeyError if unknown."""
        return self._last[self._index[pid]]

    # -- the wheel ---------------------------------------------------------

    def _tick_of(self, t: float) -> int:
        return math.floor(t / self._tick)

    def _start(self, now: float) -> None:
        if not self._started:
            self._started = True
            self._next_tick = self._tick_of(now)

    def _file(self, slot: int, deadline: float) -> None:
        b = max(self._tick_of(deadline), self._next_tick) & self._mask
        bucket = self._buckets[b]
        self._bucket[slot] = b
        self._pos[slot] = len(bucket)
        bucket.append(slot)

    def _unlink(self, slot: int) -> None:
        # Swap the bucket's last slot into this one's place: O(1), unordered.
        bucket = self._buckets[self._bucket[slot]]
        moved = bucket.pop()
        if moved != slot:
            pos = self._pos[slot]
            bucket[pos] = moved
            self._pos[moved] = pos

    # -- monitoring --------------------------------------------------------

    def _intern(self, watcher: str) -> int:
        wid = self._watcher_ids.get(watcher)
        if wid is None:
            wid = self._watcher_ids[watcher] = len(self._watchers)
            self._watchers.append(watcher)
            self._wlimit.append(self._timeout)
        return wid

    @_locked
    def set_watcher_timeout(self, watcher: str, timeout: float) -> None:
        """Give ``watcher``'s pids their own timeout, from their next beat on."""
        self._wlimit[self._intern(watcher)] = _check_seconds("timeout", timeout)

    @_locked
    def watcher_timeout(self, watcher: str) -> float:
        """The timeout of ``watcher``'s pids."""
        wid = self._watcher_ids.get(watcher)
        return self._timeout if wid is None else self._wlimit[wid]

    @_locked
    def add(
        self, pid: int, watcher: str, now: float, grace: float | None = None
    ) -> None:
        """Monitor ``pid`` of ``watcher`` (again) with a fresh deadline, ``grace``
        seconds away if given (until its first beat), else its timeout."""
        _check_pid(pid)
        wid = self._intern(watcher)
        limit = self._wlimit[wid] if grace is None else _check_seconds("grace", grace)
        self._start(now)
        slot = self._index.get(pid)
        if slot is not None:
            self._unlink(slot)
        elif self._free:
            slot = self._index[pid] = self._free.pop()
        else:
            slot = self._index[pid] = len(self._pid)
            for column in (self._pid, self._bucket, self._pos, self._wid):
                column.append(0)
            self._last.append(0.0)
            self._limit.append(0.0)
        self._pid[slot] = pid
        self._wid[slot] = wid
        self._last[slot] = now
        self._limit[slot] = limit
        self._file(slot, now + limit)

    @_locked
    def remove(self, pid: int) -> bool:
        """Stop monitoring ``pid``; False if it was not monitored."""
        slot = self._index.pop(pid, None)
        if slot is None:
            return False
        self._unlink(slot)
        self._free.append(slot)
        return True

    @_locked
    def beat(self, pid: int, now: float) -> bool:
        """Record a heartbeat; False (and nothing created) for an unknown pid."""
        slot = self._index.get(pid)
        if slot is None:
            return False
        self._refresh(slot, now)
        return True

    def _refresh(self, slot: int, now: float) -> None:
        if now > self._last[slot]:
            self._last[slot] = now
        limit = self._wlimit[self._wid[slot]]
        if self._limit[slot] != limit:
            # The grace period ends (or the watcher's timeout changed): the
            # deadline may move earlier than the bucket it is filed in.
            self._limit[slot] = limit
            self._unlink(slot)
            self._file(slot, self._last[slot] + limit)

    @_locked
    def expire(self, now: float) -> list[tuple[int, str]]:
        """Remove and return ``(pid, watcher)`` of every pid silent for longer
        than ``timeout`` at ``now``.

        Costs the buckets of the ticks elapsed since the last call (at most one
        turn of the wheel) and the slots filed in them.
        """
        self._start(now)
        now_tick = max(self._tick_of(now), self._next_tick)
        span = min(now_tick - self._next_tick + 1, self._mask + 1)
        buckets, last, limit = self._buckets, self._last, self._limit
        out: list[tuple[int, str]] = []
        for i in range(span):
            b = (self._next_tick + i) & self._mask
            walked = buckets[b]
            if not walked:
                continue
            buckets[b] = []  # detach: re-filing into b must not be walked again
            for slot in walked:
                deadline = last[slot] + limit[slot]
                if deadline < now:
                    pid = self._pid[slot]
                    out.append((pid, self._watchers[self._wid[slot]]))
                    del self._index[pid]
                    self._free.append(slot)
                else:
                    self._file(slot, deadline)
        # The current tick is only partly over: it is walked again next time.
        self._next_tick = now_tick
        return out

    # -- sockets -----------------------------------------------------------

    @property
    @_locked
    def kernel_drops(self) -> int:
        """Datagrams the kernel dropped on the drained socket, as of the last
        datagram read (needs SO_RXQ_OVFL set on the socket; 0 otherwise)."""
        return self._drops

    @property
    @_locked
    def control_truncated(self) -> int:
        """Datagrams whose control data (credentials, passed descriptors) did
        not fit the receive buffer (MSG_CTRUNC); the kernel closed the rest."""
        return self._ctrunc

    def _recv(self, sock: socket.socket) -> int:
        # One datagram into self._buf: its length (MAX_DATAGRAM + 1 when it
        # was longer), or -1 when nothing is queued.  Notes the kernel's drop
        # count (SO_RXQ_OVFL) and the sender's pid (SCM_CREDENTIALS, Unix
        # sockets with SO_PASSCRED) in self._drops and self._sender, and
        # closes every descriptor the sender passed (SCM_RIGHTS).
        try:
            n, ancdata, flags, _ = sock.recvmsg_into(
                [self._buf], _CONTROL_SIZE, _RECV_FLAGS
            )
        except BlockingIOError:
            return -1
        self._sender = 0
        if flags & socket.MSG_CTRUNC:
            self._ctrunc += 1
        for level, kind, data in ancdata:
            if level != socket.SOL_SOCKET:
                continue
            if kind == SO_RXQ_OVFL and len(data) >= 4:
                count = int.from_bytes(data[:4], sys.byteorder)
                self._drops = max(self._drops, count)
            elif kind == SCM_CREDENTIALS and len(data) >= _UCRED.size:
                self._sender = _UCRED.unpack_from(data)[0]
            elif kind == socket.SCM_RIGHTS:
                _close_passed(data)
        return MAX_DATAGRAM + 1 if flags & socket.MSG_TRUNC else n

    @_locked
    def drain_notify(
        self,
        sock: socket.socket | int,
        now: float,
        budget: int,
        resolve: Callable[[int], int] | None = None,
    ) -> DrainCounts:
        """Read up to ``budget`` sd_notify datagrams from a Unix socket with
        SO_PASSCRED and apply ``WATCHDOG=1`` as a heartbeat of the sender's pid.

        The pid comes from the kernel's credentials, never from the payload.
        A valid message without ``WATCHDOG=1`` (``READY=1``, ``STATUS=...``) is
        counted only in ``datagrams``.  For a sender not in the table,
        ``resolve(pid)``, when given, names the pid to beat instead (0: none;
        it is called once per such datagram and must not raise).
        """
        if isinstance(sock, int):
            with _borrowed(sock) as borrowed:
                return self.drain_notify(borrowed, now, budget, resolve)
        index = self._index
        datagrams = heartbeats = unknown = malformed = 0
        while datagrams < budget:
            n = self._recv(sock)
            if n < 0:
                break
            datagrams += 1
            pid = self._sender
            kind = notify_kind(bytes(self._buf[:n])) if n <= MAX_DATAGRAM else -1
            if pid <= 0 or kind < 0:
                malformed += 1
                continue
            if kind == 0:
                continue
            slot = index.get(pid)
            if slot is None and resolve is not None:
                parent = resolve(pid)
                if type(parent) is int and 0 < parent <= PID_MAX:
                    slot = index.get(parent)
            if slot is None:
                unknown += 1
                continue
            heartbeats += 1
            self._refresh(slot, now)
        return DrainCounts(datagrams, heartbeats, unknown, malformed)

    @_locked
    def drain(
        self,
        sock: socket.socket | int,
        now: float,
        budget: int,
        max_age: float = 0.0,
        wall: float = 0.0,
    ) -> DrainCounts:
        """Read up to ``budget`` waiting datagrams and apply their heartbeats.

        ``sock`` is a socket or its file descriptor, blocking or not, but with
        no timeout set (Python would wait for it).  With ``max_age`` > 0, a
        heartbeat whose timestamp is not within ``max_age`` seconds of the
        wall-clock time ``wall`` is stale: counted, not applied.  Never blocks
        and never raises for what a datagram contains; socket errors other than
        "nothing to read" propagate as OSError.
        """
        if isinstance(sock, int):
            with _borrowed(sock) as borrowed:
                return self.drain(borrowed, now, budget, max_age, wall)
        buf = self._buf
        index = self._index
        datagrams = heartbeats = unknown = malformed = stale = 0
        while datagrams < budget:
            n = self._recv(sock)
            if n < 0:
                break
            datagrams += 1
            data = bytes(buf[:n])
            pid = parse_heartbeat(data) if n <= MAX_DATAGRAM else None
            if pid is None:
                malformed += 1
                continue
            if max_age > 0:
                ts = heartbeat_timestamp(data)
                if ts is None or not wall - max_age <= ts <= wall + max_age:
                    stale += 1
                    continue
            slot = index.get(pid)
            if slot is None:
                unknown += 1
                continue
            heartbeats += 1
            self._refresh(slot, now)
        return DrainCounts(datagrams, heartbeats, unknown, malformed, stale)

    @_locked
    def drain_raw(
        self, sock: socket.socket | int, budget: int
    ) -> tuple[list[bytes], int]:
        """Read up to ``budget`` datagrams for a custom ``msg_regex``.

        Returns the payloads of at most 1024 bytes, and how many longer
        datagrams were dropped.
        """
        if isinstance(sock, int):
            with _borrowed(sock) as borrowed:
                return self.drain_raw(borrowed, budget)
        buf = self._buf
        payloads: list[bytes] = []
        oversized = 0
        while len(payloads) + oversized < budget:
            n = self._recv(sock)
            if n < 0:
                break
            if n > MAX_DATAGRAM:
                oversized += 1
            else:
                payloads.append(bytes(buf[:n]))
        return payloads, oversized

    # -- the reader thread -------------------------------------------------

    @_locked
    def start_reader(
        self,
        sock: socket.socket | int,
        *,
        budget: int,
        flood_delay: float,
        max_age: float = 0.0,
    ) -> None:
        """Start the one thread that reads ``sock`` (a bound UDP socket or its
        descriptor, made blocking: the thread is its only reader) and applies
        its heartbeats; RuntimeError if already reading.  The caller keeps the
        socket open until ``stop_reader`` returns."""
        budget, flood_delay, max_age = _check_reader_args(budget, flood_delay, max_age)
        if self._reader is not None:
            raise RuntimeError("the table is already reading a socket")
        fd = sock if isinstance(sock, int) else sock.fileno()
        os.set_blocking(fd, True)
        wake_r, wake_w = os.pipe()
        reader = _Reader(fd, wake_r, wake_w)
        reader.thread = threading.Thread(
            target=self._read_loop,
            args=(reader, budget, flood_delay, max_age),
            name="circus-watchdog-reader",
            daemon=True,
        )
        self._reader = reader
        reader.thread.start()

    def stop_reader(self) -> None:
        """Stop the reader thread and return once it has ended (idempotent)."""
        with self._lock:
            reader = self._reader
            if reader is None:
                return
            if not reader.stopping:
                reader.stopping = True
                os.write(reader.wake_w, b"x")
        reader.thread.join()  # without the lock: the thread may wait for it
        with self._lock:
            if self._reader is reader:
                self._reader = None
                os.close(reader.wake_r)
                os.close(reader.wake_w)

    @_locked
    def reader_counts(self) -> DrainCounts:
        """What the reader thread read since the last call (then zeroed)."""
        counts = DrainCounts(*self._read)
        self._read = [0, 0, 0, 0, 0]
        return counts

    @property
    @_locked
    def reader_wakeups(self) -> int:
        """Reads the reader thread made so far (monotonic)."""
        return self._wakeups

    @property
    @_locked
    def reader_errors(self) -> int:
        """Read errors the reader thread met so far (each followed by a pause)."""
        return self._errors

    @property
    @_locked
    def reading(self) -> bool:
        """Whether a reader thread is running (until stop_reader returns)."""
        return self._reader is not None

    def _read_loop(
        self, reader: _Reader, budget: int, flood_delay: float, max_age: float
    ) -> None:
        poller = select.poll()
        poller.register(reader.fd, select.POLLIN)
        poller.register(reader.wake_r, select.POLLIN)
        flood = _Flood(flood_delay)
        with _borrowed(reader.fd) as sock:
            while not reader.stopping:
                poller.poll()
                if reader.stopping:
                    break
                datagrams = self._read_pass(sock, budget, max_age)
                pause = flood.after(datagrams, time.monotonic())
                if datagrams < 0:
                    time.sleep(ERROR_PAUSE)
                elif pause and datagrams < budget:  # else read the rest at once
                    time.sleep(pause)

    @_locked
    def _read_pass(self, sock: socket.socket, budget: int, max_age: float) -> int:
        # One read of the thread: the datagrams it read, or -1 on an error.
        self._wakeups += 1
        wall = time.time() if max_age > 0 else 0.0
        try:
            counts = self.drain(sock, time.monotonic(), budget, max_age, wall)
        except (OSError, MemoryError):
            self._errors += 1
            return -1
        self._read = [a + b for a, b in zip(self._read, counts, strict=True)]
        return counts.datagrams


class _Flood:
    """How long the reader thread sleeps after a read (FLOOD_BATCH): the
    average time per datagram over its last reads, against ``flood_delay``."""

    def __init__(self, flood_delay: float) -> None:
        self._delay = flood_delay
        self._longest = max(flood_delay, LONGEST_WAIT)
        self._last = time.monotonic()
        self._gap = flood_delay  # seconds per datagram: sparse until shown otherwise

    def after(self, datagrams: int, now: float) -> float:
        """Note a read of ``datagrams`` at ``now``; the seconds to sleep (0:
        not a flood, read on arrival)."""
        if datagrams > 0:
            gap = (now - self._last) / datagrams
            self._gap += (gap - self._gap) / FLOOD_SMOOTHING
            self._last = now
        if self._delay <= 0 or self._gap * FLOOD_BATCH > self._delay:
            return 0.0
        return min(max(self._gap * FLOOD_READ, self._delay), self._longest)


class _Reader:
    """The reader thread's state: its socket, and its wake pipe."""

    def __init__(self, fd: int, wake_r: int, wake_w: int) -> None:
        self.fd = fd
        self.wake_r = wake_r
        self.wake_w = wake_w
        self.stopping = False
        self.thread: threading.Thread


def _close_passed(data: bytes) -> None:
    # The payload of one SCM_RIGHTS message: whole C ints, each a descriptor
    # the kernel just installed in this process.
    fds = array.array("i")
    fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


@contextmanager
def _borrowed(fd: int) -> Iterator[socket.socket]:
    # A socket object over someone else's descriptor, detached (not closed)
    # when done.
    sock = socket.socket(fileno=fd)
    try:
        yield sock
    finally:
        sock.detach()
