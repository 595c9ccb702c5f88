"""The receive path over real loopback sockets, on both cores and both loops:
every datagram is read, by the core's reader thread (the default format) or
on the event loop (a custom format, the sd_notify socket); and the
event-loop schedule, on a simulated loop: wake-ups follow time, not
datagrams."""

from __future__ import annotations

import asyncio
import math
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from circus_watchdog.metrics import Metrics
from circus_watchdog.receiver import (
    SPARSE_DELAY,
    TO_READABILITY,
    TO_TIMER,
    Coalescer,
    Receiver,
)
from fake_circusd import config
from support import free_udp_port

LoopFactory = Callable[[], asyncio.AbstractEventLoop]
PID = 4242
SENT = 2000


def receiver(core: ModuleType, **options: str) -> Receiver:
    cfg = config(loop_rate="10", **options)
    table = core.HeartbeatTable(cfg.timeout, cfg.tick)
    table.add(PID, "web", time.monotonic())
    table.add(os.getpid(), "web", time.monotonic())
    return Receiver(cfg, table, Metrics())


def paced(address: tuple[str, int], count: int = SENT) -> threading.Thread:
    """Send ``count`` heartbeats in bursts of 4, about 0.2 ms apart."""

    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for i in range(count):
                sock.sendto(b"%d;1" % PID, address)
                if i % 4 == 3:
                    time.sleep(0.0002)

    return threading.Thread(target=send, daemon=True)


def counted(rx: Receiver) -> Metrics:
    """The metrics with the reader thread's counts collected (as a tick does)."""
    rx.collect()
    return rx.metrics


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.005)):
        if predicate():
            return
        await asyncio.sleep(0.005)
    assert predicate()


def run(loop_factory: LoopFactory, coro: object) -> None:
    loop = loop_factory()
    try:
        loop.run_until_complete(coro)  # type: ignore[arg-type]
    finally:
        loop.close()


def test_a_read_that_finds_an_unknown_pid_says_so(
    core: ModuleType, loop_factory: LoopFactory
) -> None:
    # What makes sync re-sync for unknown pids (no polling of the count).
    cfg = config(loop_rate="10", port=str(free_udp_port()))
    table = core.HeartbeatTable(cfg.timeout, cfg.tick)
    table.add(PID, "web", time.monotonic())
    seen: list[int] = []
    rx = Receiver(cfg, table, Metrics(), on_unknown=lambda: seen.append(1))

    async def scenario() -> None:
        rx.open()
        rx.start(asyncio.get_running_loop())
        assert rx.address is not None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"%d;1" % PID, rx.address)
            await until(lambda: counted(rx).heartbeats == 1)
            assert not seen  # a monitored pid: nothing to say
            sock.sendto(b"%d;1" % (PID + 1), rx.address)
            await until(lambda: counted(rx).unknown == 1)
        rx.close()

    run(loop_factory, scenario())
    assert seen == [1]


@pytest.mark.parametrize("delay", ["0.002", "0"])
def test_every_datagram_is_read(
    core: ModuleType, loop_factory: LoopFactory, delay: str
) -> None:
    rx = receiver(core, port=str(free_udp_port()), batch_delay=delay)

    async def scenario() -> None:
        rx.open()
        rx.start(asyncio.get_running_loop())
        assert rx.address is not None and not rx._readers  # the core's thread
        sender = paced(rx.address)
        sender.start()
        await until(lambda: counted(rx).heartbeats == SENT)
        sender.join()
        if delay != "0":
            # A flood (bursts 0.2 ms apart) is read every batch_delay, in
            # batches: far fewer reads than datagrams.
            assert rx.wakeups < SENT / 4, rx.wakeups
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"%d;2" % PID, rx.address)
        await until(lambda: counted(rx).heartbeats == SENT + 1)
        rx.close()

    run(loop_factory, scenario())
    assert rx.metrics.datagrams == SENT + 1 and rx.metrics.unknown == 0


def test_a_thin_stream_is_read_on_arrival_and_idle_costs_nothing(
    core: ModuleType, loop_factory: LoopFactory
) -> None:
    # One datagram about every 2 ms (500/s, a fleet's rate): the thread reads
    # each on arrival; with no traffic it makes no read at all.
    rx = receiver(core, port=str(free_udp_port()))
    count = 100

    async def scenario() -> None:
        rx.open()
        rx.start(asyncio.get_running_loop())
        assert rx.address is not None
        await asyncio.sleep(0.2)
        assert rx.wakeups == 0  # idle: not one read
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for _ in range(count):
                before = time.monotonic()
                sock.sendto(b"%d;1" % PID, rx.address)
                # read at once: last_seen moves past the send within a bound
                await until(lambda t=before: rx.table.last_seen(PID) >= t, 5.0)
                await asyncio.sleep(0.002)
        assert counted(rx).heartbeats == count
        assert count <= rx.wakeups <= 2 * count, rx.wakeups
        rx.close()

    run(loop_factory, scenario())


def test_a_backlog_larger_than_the_budget_is_read(
    core: ModuleType, loop_factory: LoopFactory
) -> None:
    rx = receiver(core, port=str(free_udp_port()), budget="16")
    rx.open()
    assert rx.address is not None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _ in range(500):
            sock.sendto(b"%d;1" % PID, rx.address)

    async def scenario() -> None:
        rx.start(asyncio.get_running_loop())
        await until(lambda: counted(rx).heartbeats == 500)
        rx.close()

    run(loop_factory, scenario())


def test_close_stops_the_thread_and_keeps_its_last_counts(
    core: ModuleType, loop_factory: LoopFactory
) -> None:
    rx = receiver(core, port=str(free_udp_port()))

    async def scenario() -> None:
        rx.open()
        rx.start(asyncio.get_running_loop())
        assert rx.address is not None and rx.table.reading
        added = rx.table.last_seen(PID)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"%d;1" % PID, rx.address)
        await until(lambda: rx.table.last_seen(PID) > added)
        rx.close()  # collects what the thread counted: no tick needed

    run(loop_factory, scenario())
    assert not rx.table.reading and rx.metrics.heartbeats == 1


def test_custom_format_and_unix_socket_use_the_same_path(
    core: ModuleType, loop_factory: LoopFactory, tmp_path: Path
) -> None:
    path = tmp_path / "notify.sock"
    rx = receiver(
        core,
        port=str(free_udp_port()),
        msg_regex=r"^hb (?P<pid>\d+)$",
        unix_socket=str(path),
    )

    async def scenario() -> None:
        rx.open()
        rx.start(asyncio.get_running_loop())
        assert rx.address is not None and len(rx._readers) == 2
        address = rx.address

        def send() -> None:  # a Unix datagram socket blocks when full: a thread
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                    for _ in range(300):
                        udp.sendto(b"hb %d" % PID, address)
                        notify.sendto(b"WATCHDOG=1", str(path))

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        await until(lambda: rx.metrics.heartbeats == 600)
        sender.join()
        rx.close()
        assert not path.exists()

    run(loop_factory, scenario())


class FakeLoop:
    """Records what the coalescer asks of the event loop."""

    def __init__(self) -> None:
        self.reader: Callable[[], None] | None = None
        self.timer: tuple[float, Callable[[], None]] | None = None

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self.reader = callback

    def remove_reader(self, fd: int) -> bool:
        self.reader = None
        return True

    def call_later(self, delay: float, callback: Callable[[], None]) -> object:
        self.timer = (delay, callback)
        return self

    def call_soon(self, callback: Callable[[], None]) -> object:
        self.timer = (0.0, callback)
        return self

    def cancel(self) -> None:
        self.timer = None

    def fire(self) -> None:
        """Run the timer that is due (it is spent once run)."""
        assert self.timer is not None
        callback, self.timer = self.timer[1], None
        callback()


def coalescer(reads: list[int]) -> tuple[Coalescer, FakeLoop, list[float]]:
    loop, now = FakeLoop(), [0.0]
    queue = iter(reads)
    c = Coalescer(
        loop,  # type: ignore[arg-type]
        3,
        lambda: next(queue),
        delay=0.001,
        budget=256,
        clock=lambda: now[0],
    )
    c.start()
    return c, loop, now


def test_light_traffic_stays_on_readability() -> None:
    c, loop, now = coalescer([1] * 10)
    for i in range(10):  # one datagram every 5 ms: the timer would save nothing
        now[0] = i * 0.005
        assert loop.reader is not None and loop.timer is None
        loop.reader()
    assert c.wakeups == 10 and c.interval is None


def test_one_close_pair_does_not_flip_it() -> None:
    # Pairs of datagrams every 10 ms: one close pair is no trend.
    c, loop, now = coalescer([1] * 20)
    for i in range(10):
        for offset in (0.0, 0.00005):
            now[0] = i * 0.01 + offset
            assert loop.reader is not None and loop.timer is None
            loop.reader()
    assert c.wakeups == 20


def test_heavy_traffic_moves_to_the_timer_and_back() -> None:
    c, loop, now = coalescer([1, 1, 1, 1, 200, 0, 100, 256, 20, 2, 0, 0, 0])
    for i in range(TO_TIMER + 1):  # wake-ups 0.1 ms apart
        now[0] = i * 0.0001
        assert loop.reader is not None
        loop.reader()
    assert loop.reader is None and loop.timer is not None
    assert loop.timer[0] == SPARSE_DELAY  # the timer starts at its longest
    loop.fire()  # 200 read: a flood, the interval halves
    assert loop.timer is not None and loop.timer[0] == SPARSE_DELAY / 2
    loop.fire()  # 0: one quiet interval (a sender's pause) is no end
    assert loop.timer is not None and loop.timer[0] == SPARSE_DELAY
    loop.fire()  # 100: halves again
    assert loop.timer is not None and loop.timer[0] == SPARSE_DELAY / 2
    loop.fire()  # 256 = budget: more is queued, read again at once
    assert loop.timer is not None and loop.timer[0] == 0.0
    loop.fire()  # 20: between GROW_BELOW and SHRINK_ABOVE, the interval holds
    assert loop.timer is not None and loop.timer[0] == SPARSE_DELAY / 2
    loop.fire()  # 2: few, it grows
    assert loop.timer is not None and loop.timer[0] == SPARSE_DELAY
    for _ in range(TO_READABILITY - 1):
        loop.fire()  # 0
        assert loop.reader is None
    loop.fire()  # TO_READABILITY empty reads in a row: back to readability
    assert loop.reader is not None and loop.timer is None
    assert c.wakeups == 13


def test_zero_delay_reads_on_every_wake_up() -> None:
    loop = FakeLoop()
    c = Coalescer(
        loop,  # type: ignore[arg-type]
        3,
        lambda: 5,
        delay=0.0,
        budget=64,
        clock=lambda: 0.0,
    )
    c.start()
    for _ in range(5):
        assert loop.reader is not None
        loop.reader()
    assert loop.timer is None and c.wakeups == 5


class SimLoop(FakeLoop):
    """An event loop on a simulated clock (ms resolution is far too coarse:
    seconds as floats), with a socket fed by a list of arrival times.

    Readability is level-triggered, as epoll's is for add_reader: a reader
    runs whenever something is queued.  Every datagram's wait from arrival to
    read is recorded."""

    BUDGET = 4096

    def __init__(self, arrivals: list[float]) -> None:
        super().__init__()
        self.now = 0.0
        self._arrivals = iter(arrivals)
        self._next: float | None = next(self._arrivals, None)
        self._queue: list[float] = []
        self.waits: list[float] = []
        self.timers = 0  # timer callbacks run

    def call_later(self, delay: float, callback: Callable[[], None]) -> object:
        self.timer = (self.now + delay, callback)  # when due, not the delay
        return self

    def call_soon(self, callback: Callable[[], None]) -> object:
        return self.call_later(0.0, callback)

    def read(self) -> int:
        batch = self._queue[: self.BUDGET]
        del self._queue[: self.BUDGET]
        self.waits += [self.now - t for t in batch]
        return len(batch)

    def run(self, until: float, steps: int = 10**6) -> None:
        for _ in range(steps):
            due = self.timer[0] if self.timer is not None else math.inf
            arrival = self._next if self._next is not None else math.inf
            if self.reader is not None and self._queue:
                self.reader()
            elif min(due, arrival) > until:
                self.now = until
                return
            elif arrival <= due:
                self.now = arrival
                self._queue.append(arrival)
                self._next = next(self._arrivals, None)
            else:
                assert self.timer is not None
                self.now, callback = self.timer[0], self.timer[1]
                self.timer = None
                self.timers += 1
                callback()
        raise AssertionError("the simulation did not end")


def simulate(rate: float, seconds: float, delay: float = 0.001) -> tuple[SimLoop, int]:
    """``rate`` datagrams/s, each pid's phase its own (random arrivals), for
    ``seconds``, then as long again with nothing; the loop and the wake-ups
    while the traffic lasted."""
    rng = random.Random(1664)
    arrivals = sorted(rng.uniform(0, seconds) for _ in range(int(rate * seconds)))
    loop = SimLoop(arrivals)
    c = Coalescer(
        loop,  # type: ignore[arg-type]
        3,
        loop.read,
        delay=delay,
        budget=SimLoop.BUDGET,
        clock=lambda: loop.now,
    )
    c.start()
    loop.run(seconds)
    wakeups = c.wakeups
    loop.run(2 * seconds)
    return loop, wakeups


@pytest.mark.parametrize(
    ("rate", "most"),  # wake-ups per second, at most
    [(1000, 260), (5000, 260), (20000, 510), (50000, 1010), (200000, 1010)],
)
def test_wake_ups_fall_as_traffic_thins_within_the_freshness_bound(
    rate: int, most: int
) -> None:
    loop, wakeups = simulate(rate, 2.0)
    assert len(loop.waits) == 2 * rate  # every datagram read
    assert max(loop.waits) <= SPARSE_DELAY + 1e-9 < 0.005
    assert wakeups / 2.0 <= most, wakeups
    # Idle again: back on readability, no timer left.
    assert loop.timer is None and loop.reader is not None


def test_a_flood_is_read_every_batch_delay_at_most() -> None:
    loop, wakeups = simulate(200000, 1.0, delay=0.002)
    assert max(loop.waits) <= SPARSE_DELAY + 1e-9  # the first reads
    assert sorted(loop.waits)[-1000] <= 0.002 + 1e-9  # then every batch_delay
    assert 400 <= wakeups <= 510, wakeups


def test_a_sparse_fleet_is_read_at_once_and_costs_no_timer() -> None:
    loop, wakeups = simulate(50, 2.0)
    assert max(loop.waits) == 0.0 and wakeups == 100
    assert loop.timers == 0
