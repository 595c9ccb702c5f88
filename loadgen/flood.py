"""The sending side of loadgen: payloads, the paced send loop and worker processes."""

from __future__ import annotations

import math
import random
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from fractions import Fraction
from multiprocessing.queues import Queue
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Barrier as BarrierType
from multiprocessing.synchronize import Event as EventType
from typing import Any

from circus_watchdog.pids import PID_MAX

from ._send import send_datagrams, send_heartbeats

# One sender call sends at most this many datagrams: it splits them into
# sendmmsg(2) batches of 64, and a short call keeps the count exact when a call
# fails half-way (an OSError loses how many of that call went out).
CALL_MAX = 256
# Pacing: after sending what is due, sleep at least this long, so a high rate
# goes out in batches every PACE seconds instead of spinning on the clock.
PACE = 0.002
FULL_PAUSE = 0.0005  # seconds to wait when the socket buffer is full (EAGAIN)
ERROR_PAUSE = 0.001  # seconds to wait after a send error (e.g. ECONNREFUSED)
PROGRESS_EVERY = 0.05  # seconds between progress reports of a worker
# Unknown pids are drawn above Linux's largest pid_max (2**22), so they never
# name a process, yet they are valid heartbeats.
UNKNOWN_LO = 100_000_000

# Datagrams that the heartbeat format rejects (design.md: "Heartbeat format").
# Fixed so that a run is repeatable and its shares can be checked exactly.
MALFORMED: tuple[bytes, ...] = (
    b"garbage",
    b"-5;1",
    b"1;" + b"0" * 1998,  # 2000 bytes: over the 1024-byte limit
    b"",  # empty datagram
    b";1764310000.123",  # empty pid
    b"0;1",  # pid 0
    b"01234;1",  # zero-led pid
    b"99999999999;1",  # eleven digits
    b"2147483648;1",  # above pid_t
    b"12 34;1",  # not a number
    b"1234\n;1",  # newline inside
    b"1234;\xff\xfe",  # invalid UTF-8
    b"1234 1764310000.123",  # no separator
)


@dataclass(frozen=True)
class Plan:
    """What one worker sends: where, which pids, how fast, how much and how long."""

    index: int
    family: int
    sockaddr: tuple[Any, ...]
    pids: tuple[int, ...]
    rate: float | None  # datagrams per second; None: as fast as possible
    count: int | None  # datagrams; None: until the duration ends
    duration: float  # seconds
    malformed: float  # share of malformed datagrams, 0..1
    unknown: float  # share of heartbeats for unknown pids, 0..1
    sndbuf: int  # bytes asked for SO_SNDBUF
    seed: int


@dataclass
class Result:
    """What one worker did."""

    worker: int
    sent: int = 0
    valid: int = 0
    malformed: int = 0
    unknown: int = 0
    errors: int = 0  # send calls that raised OSError
    last_error: str | None = None  # the last of those errors
    full: int = 0  # send calls cut short by a full socket buffer
    start: float = 0.0  # time.monotonic(), shared by all processes on a host
    end: float = 0.0
    interrupted: bool = False
    error: str | None = None  # why the worker could not run at all

    @property
    def elapsed(self) -> float:
        """Seconds between the first send and the end of the loop."""
        return max(self.end - self.start, 0.0)

    @property
    def rate(self) -> float:
        """Achieved datagrams per second."""
        return self.sent / self.elapsed if self.elapsed > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: counters, elapsed seconds and achieved rate."""
        d = asdict(self)
        del d["start"], d["end"]
        d["elapsed"] = round(self.elapsed, 6)
        d["rate"] = round(self.rate, 1)
        return d


def open_socket(plan: Plan) -> socket.socket:
    """A UDP socket with a raised send buffer, connected to the target."""
    sock = socket.socket(plan.family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, plan.sndbuf)
        sock.connect(plan.sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


class Sender:
    """Sends the planned mix of datagrams on a connected socket, keeping shares."""

    def __init__(self, plan: Plan, sock: socket.socket) -> None:
        self._sock = sock
        # Exact shares: floor(20000 * 0.3) must be 6000, not 5999.
        self._fm = Fraction(plan.malformed).limit_denominator(10**9)
        self._fu = Fraction(plan.unknown).limit_denominator(10**9)
        pids = plan.pids
        self._npids = len(pids)
        # Repeat the pids so that a slice of up to CALL_MAX never wraps.
        self._cycle = list(pids) * math.ceil((len(pids) + CALL_MAX) / len(pids))
        self._pos = plan.index * 7919 % len(pids)  # workers start apart
        self._known = frozenset(pids)
        self._rng = random.Random(plan.seed)
        self.sent = self.valid = self.malformed = self.unknown = 0

    def _unknown_payloads(self, n: int, ts: float) -> list[bytes]:
        out = []
        for _ in range(n):
            pid = self._rng.randint(UNKNOWN_LO, PID_MAX)
            for _ in range(len(self._known)):  # bounded: skip the known pids
                if pid not in self._known:
                    break
                pid = pid + 1 if pid < PID_MAX else UNKNOWN_LO
            out.append(b"%d;%.3f" % (pid, ts))
        return out

    def send(self, want: int) -> int:
        """Send up to ``want`` (<= CALL_MAX) datagrams; return how many went out.

        Shares are kept per call: the malformed and unknown datagrams due by
        the end of this call go first, then valid heartbeats.
        """
        ts = time.time()
        target = self.sent + want
        m = min(max(math.floor(target * self._fm) - self.malformed, 0), want)
        u = min(max(math.floor(target * self._fu) - self.unknown, 0), want - m)
        v = want - m - u
        done = 0
        if m or u:
            n = len(MALFORMED)
            payloads = [MALFORMED[(self.malformed + j) % n] for j in range(m)]
            payloads += self._unknown_payloads(u, ts)
            done = send_datagrams(self._sock, None, payloads)
            self.malformed += min(done, m)
            self.unknown += max(done - m, 0)
            self.sent += done
            if done < m + u:
                return done
        if v:
            pos = self._pos
            got = send_heartbeats(self._sock, None, self._cycle[pos : pos + v], ts)
            self._pos = (pos + got) % self._npids
            self.valid += got
            self.sent += got
            done += got
        return done


def run(
    plan: Plan,
    sock: socket.socket,
    progress: Callable[[int], bool] | None = None,
) -> Result:
    """Send until the count is reached or the duration ends, paced to the rate.

    ``progress(sent)`` is called every PROGRESS_EVERY seconds; returning True
    stops the run.  Ctrl-C stops it too; either way the partial result returns.
    """
    res = Result(worker=plan.index)
    sender = Sender(plan, sock)
    rate, count = plan.rate, plan.count
    start = res.start = time.monotonic()
    end = start + plan.duration
    next_progress = start + PROGRESS_EVERY
    try:
        while True:
            now = time.monotonic()
            if now >= end:
                break
            sent = sender.sent
            left = CALL_MAX if count is None else count - sent
            if left <= 0:
                break
            want = min(left, CALL_MAX)
            if rate is not None:
                # The cumulative schedule: datagram k (from 0) is due at k / rate.
                due = math.floor((now - start) * rate) + 1
                if due <= sent:
                    wake = start + sent / rate
                    time.sleep(min(max(wake - now, PACE), end - now))
                    continue
                want = min(want, due - sent)
            try:
                got = sender.send(want)
            except OSError as exc:
                res.errors += 1
                res.last_error = f"{type(exc).__name__}: {exc.strerror or exc}"
                time.sleep(ERROR_PAUSE)
            else:
                if got < want:
                    res.full += 1
                    time.sleep(FULL_PAUSE)
            if progress is not None and now >= next_progress:
                next_progress = now + PROGRESS_EVERY
                if progress(sender.sent):
                    res.interrupted = True
                    break
    except KeyboardInterrupt:
        res.interrupted = True
    res.end = time.monotonic()
    res.sent, res.valid = sender.sent, sender.valid
    res.malformed, res.unknown = sender.malformed, sender.unknown
    return res


def split(total: int, parts: int) -> list[int]:
    """Split ``total`` into ``parts`` integers that differ by at most one."""
    q, r = divmod(total, parts)
    return [q + (1 if i < r else 0) for i in range(parts)]


STARTUP_TIMEOUT = 30.0  # seconds a worker waits for "go" before giving up


@dataclass(frozen=True)
class Control:
    """How a worker process and the parent talk (multiprocessing primitives)."""

    barrier: BarrierType  # every worker and the parent: the flood starts together
    stop: EventType  # set by the parent: stop now and report
    sent: Synchronized[int]  # this worker's running count, for the progress line
    results: Queue[tuple[int, Result | str]]  # (index, Result or error message)


def worker_main(plan: Plan, control: Control) -> None:
    """Entry point of a worker process: open, meet the others, run, report."""
    # The parent turns Ctrl-C into `stop`, so workers report a partial result
    # instead of a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        sock = open_socket(plan)
    except Exception as exc:  # any failure here must break the barrier at once
        control.results.put((plan.index, f"worker {plan.index}: {exc}"))
        control.barrier.abort()
        return
    with sock:
        try:
            control.barrier.wait()
        except threading.BrokenBarrierError:
            return

        def progress(sent: int) -> bool:
            control.sent.value = sent
            return control.stop.is_set()

        result = run(plan, sock, progress)
        control.sent.value = result.sent
        control.results.put((plan.index, result))
