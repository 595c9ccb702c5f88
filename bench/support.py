"""What the benchmarks share: sizes, the simulated clock and the original plugin."""

from __future__ import annotations

import importlib
import random
import resource
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import repeat
from types import ModuleType
from typing import Any

TIMEOUT = 3.0  # seconds: loop_rate 1 s x max_count 3
TICK = 0.1  # seconds: loop_rate / 10, the core's default granularity
TICKS_PER_BEAT = 10  # every pid beats once a (simulated) second
SPAWN_TICKS = 20  # pids are spawned during the first two seconds
T0 = 1_000_000.0  # simulated epoch, far from 0 like a real time.time()
SIZES = {"1k": 1_000, "10k": 10_000, "100k": 100_000, "1M": 1_000_000}
WATCHERS = tuple(f"worker{i}" for i in range(8))
HEARTBEAT = b"12345;1764310000.123"  # a typical default-format datagram


def core_module(tag: str) -> ModuleType:
    """``circus_watchdog._core_c`` for "c", ``circus_watchdog._core_py`` for "py"."""
    return importlib.import_module(f"circus_watchdog._core_{tag}")


def compiled_sender() -> Callable[..., int]:
    """loadgen's compiled ``send_heartbeats`` (sendmmsg), else its pure twin."""
    try:
        module = importlib.import_module("circus_watchdog.loadgen._send_c")
    except ImportError:
        module = importlib.import_module("circus_watchdog.loadgen._send_py")
    return module.send_heartbeats  # type: ignore[no-any-return]


def cpu_times() -> tuple[float, float]:
    """User and system CPU seconds of this process (system covers syscalls)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime, ru.ru_stime


@dataclass
class Impl:
    """One implementation under benchmark."""

    tag: str
    core: ModuleType | None = None  # c and py: the core module
    watchdog: Any = None  # original: a circus WatchDog (see original_watchdog)
    count_drain: Callable[[int, int], int] | None = None  # count: bench/count_drain.c

    def __str__(self) -> str:
        return self.tag


@dataclass
class UdpPair:
    """A receiving socket with a deep queue, and a sender connected to it."""

    rx: socket.socket
    tx: socket.socket
    rcvbuf: int  # bytes, as getsockopt(SO_RCVBUF) reports it
    capacity: int = 0  # heartbeats the queue holds before the kernel drops
    backlog: int = 0  # heartbeats queued before each drain round

    def flush(self) -> int:
        """Read and drop whatever is queued; returns how many datagrams."""
        n = 0
        while True:
            try:
                self.rx.recv(2048, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return n
            n += 1

    def fill(self, pids: Sequence[int]) -> None:
        """Queue one default-format heartbeat per pid on the receiver."""
        sent = compiled_sender()(self.tx, None, pids, 1764310000.123)
        if sent != len(pids):
            raise RuntimeError(f"sent {sent} of {len(pids)} heartbeats")


@contextmanager
def original_watchdog() -> Iterator[Any]:
    """circus's own WatchDog, past its start-up discovery, with ``cast`` stubbed.

    Nothing is bound or connected; its tornado loop is closed on exit.  Every
    ``cast`` (a kill) is kept in ``casts`` so a benchmark can check none happened.
    """
    from circus.plugins.watchdog import WatchDog

    wd = WatchDog("tcp://127.0.0.1:1", "tcp://127.0.0.1:2", 1.0, None)
    wd.starting = False
    wd.casts = []
    wd.cast = lambda command, **props: wd.casts.append((command, props))
    try:
        yield wd
    finally:
        wd.sock = None
        wd.loop.close(all_fds=False)


def fill_original(pid_status: dict[str, dict[str, Any]], pids: Sequence[int]) -> None:
    """Monitor ``pids`` the way the original's ``handle_recv`` does on ``spawn``."""
    for pid in pids:
        pid_status[str(pid)] = dict(
            watcher=WATCHERS[pid % len(WATCHERS)], last_activity=time.time()
        )


def fill_table(table: Any, pids: Sequence[int], now: float) -> None:
    """``table.add`` every pid at ``now``, spread over the watchers."""
    add = table.add
    for pid in pids:
        add(pid, WATCHERS[pid % len(WATCHERS)], now)


class SteadyState:
    """Drives a table through simulated time, one tick per ``step``.

    Pids are spawned during the first two simulated seconds (each in a random
    tick of them); from the second second on, every pid beats once a second in
    its own random tenth of the second (a beat before the spawn is an unknown
    pid, a no-op).  Beats are applied between ticks.  Independent spawn and
    beat phases spread the re-filing evenly over the ticks, as real processes
    do.  Nothing ever expires: beats come every 1 s against a 3 s timeout.
    """

    def __init__(self, table: Any, npids: int, seed: int = 1) -> None:
        rnd = random.Random(seed)
        self.table = table
        self.spawn: list[list[int]] = [[] for _ in range(SPAWN_TICKS)]
        self.beats: list[list[int]] = [[] for _ in range(TICKS_PER_BEAT)]
        for pid in range(1, npids + 1):
            self.spawn[rnd.randrange(SPAWN_TICKS)].append(pid)
            self.beats[rnd.randrange(TICKS_PER_BEAT)].append(pid)
        self.k = 0  # ticks done

    def step(self) -> float:
        """Apply what happens before the next tick; return that tick's time."""
        k = self.k
        # Tick k runs a quarter into its interval, beats come half a tick
        # later: both stay clear of bucket boundaries, where float rounding
        # would merge or skip ticks.
        at = T0 + (k + 0.75) * TICK
        if k < SPAWN_TICKS:
            fill_table(self.table, self.spawn[k], at)
        if k >= TICKS_PER_BEAT:
            beat = self.table.beat
            deque(map(beat, self.beats[k % TICKS_PER_BEAT], repeat(at)), maxlen=0)
        self.k = k + 1
        return T0 + (self.k + 0.25) * TICK
