"""The table's reader thread (start_reader) over real UDP sockets on 127.0.0.1."""

from __future__ import annotations

import gc
import socket
import threading
import time
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest

from circus_watchdog.sockets import SO_RXQ_OVFL

RCVBUF = 4 * 1024 * 1024
WAIT = 10.0  # seconds: the bound of every wait below
_KEPT: list[socket.socket] = []
Pair = tuple[
    socket.socket, socket.socket, tuple[str, int]
]  # sockets a leaked reader thread still blocks on


def wait_until(done: Callable[[], bool], timeout: float = WAIT) -> bool:
    """Poll ``done`` every 5 ms until it holds or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def udp_rx() -> socket.socket:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    rx.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
    rx.bind(("127.0.0.1", 0))
    return rx


@pytest.fixture
def pair() -> Iterator[Pair]:
    rx = udp_rx()
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        yield rx, tx, rx.getsockname()
    finally:
        rx.close()
        tx.close()


class Tally:
    """Sums the reader's counts over several reader_counts() calls."""

    def __init__(self, table: Any) -> None:
        self.table = table
        self.total = [0, 0, 0, 0, 0]

    def take(self) -> list[int]:
        counts = self.table.reader_counts()
        self.total = [a + b for a, b in zip(self.total, counts, strict=True)]
        return self.total

    def datagrams_reach(self, n: int) -> bool:
        return wait_until(lambda: self.take()[0] >= n)


def stop_bounded(table: Any) -> None:
    """stop_reader, failing the test (not hanging it) if it does not return."""
    stopper = threading.Thread(target=table.stop_reader, daemon=True)
    stopper.start()
    stopper.join(WAIT)
    assert not stopper.is_alive(), "stop_reader did not return"


def test_beats_reach_last_seen(core: ModuleType, pair: Pair) -> None:
    rx, tx, addr = pair
    table = core.HeartbeatTable(30.0, 0.1)
    table.add(4242, "w", 0.0)
    table.start_reader(rx, budget=64, flood_delay=0.001)
    try:
        assert table.reading
        before = time.monotonic()
        tx.sendto(b"4242;1700000000.5", addr)
        assert wait_until(lambda: table.last_seen(4242) > 0.0)
        assert before <= table.last_seen(4242) <= time.monotonic()
        assert table.reader_counts() == (1, 1, 0, 0, 0)
        assert table.reader_wakeups >= 1
        assert table.reader_errors == 0
    finally:
        stop_bounded(table)
    assert not table.reading


def test_counts_by_kind_and_reset(core: ModuleType, pair: Pair) -> None:
    rx, tx, addr = pair
    table = core.HeartbeatTable(30.0, 0.1)
    table.add(100, "w", time.monotonic())
    table.start_reader(rx, budget=64, flood_delay=0.001, max_age=60.0)
    try:
        wall = time.time()
        sent = [
            f"100;{wall}".encode(),  # known
            f"100;{wall:.0f}\n".encode(),  # known
            f"101;{wall}".encode(),  # unknown
            b"garbage",  # malformed
            b"0;1",  # malformed
            f"100;{wall - 3600}".encode(),  # stale: an hour old
            b"100;abc",  # stale: no timestamp
        ]
        for payload in sent:
            tx.sendto(payload, addr)
        tally = Tally(table)
        assert tally.datagrams_reach(len(sent))
        assert tally.total == [7, 2, 1, 2, 2]
        assert table.reader_counts() == (0, 0, 0, 0, 0)  # taken: reset to 0
        tx.sendto(b"100;x", addr)  # stale
        assert tally.datagrams_reach(8)
        assert tally.total == [8, 2, 1, 2, 3]
    finally:
        stop_bounded(table)


def test_flood_is_all_counted(core: ModuleType, pair: Pair) -> None:
    rx, tx, addr = pair
    table = core.HeartbeatTable(30.0, 0.1)
    now = time.monotonic()
    for pid in range(1000, 1500):
        table.add(pid, "w", now)
    table.start_reader(rx, budget=256, flood_delay=0.001)
    tally = Tally(table)
    sent = 0
    try:
        # 20,000 datagrams in bursts of 1,000 (a burst fits the receive
        # buffer, so the test does not depend on how fast this core reads).
        for _ in range(20):
            for i in range(1000):
                tx.sendto(b"%d;1" % (1000 + i), addr)
            sent += 1000
            assert tally.datagrams_reach(sent)
        assert tally.total == [20000, 10000, 10000, 0, 0]
        assert table.kernel_drops == 0
        assert table.reader_wakeups <= 20000
    finally:
        stop_bounded(table)


def test_churn_while_a_sender_floods(core: ModuleType, pair: Pair) -> None:
    rx, tx, addr = pair
    table = core.HeartbeatTable(0.05, 0.01)
    table.start_reader(rx, budget=256, flood_delay=0.0005)
    sent = [0]
    stop = threading.Event()

    def flood() -> None:
        deadline = time.monotonic() + WAIT
        while not stop.is_set() and time.monotonic() < deadline:
            for pid in range(2000, 2200, 4):
                tx.sendto(b"%d;1" % pid, addr)
            sent[0] += 50
            time.sleep(0.001)  # keep the queue inside the receive buffer

    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    tally = Tally(table)
    try:
        expired = 0
        for round_ in range(300):  # about 0.3 s of churn
            now = time.monotonic()
            for pid in range(2000 + round_ % 100, 2100 + round_ % 100, 7):
                table.add(pid, f"w{pid % 3}", now)
            for pid in range(2000, 2200, 11):
                table.remove(pid)
            expired += len(table.expire(now + 0.01 * (round_ % 10)))
            assert sum(table.watcher_counts().values()) == len(table)
            tally.take()
            time.sleep(0.001)
    finally:
        stop.set()
        sender.join(WAIT)
    assert not sender.is_alive()
    try:
        assert tally.datagrams_reach(sent[0])
        datagrams, heartbeats, unknown, malformed, stale = tally.total
        assert datagrams == sent[0] > 0
        assert heartbeats + unknown == datagrams
        assert heartbeats > 0 and unknown > 0
        assert malformed == stale == 0
        assert table.kernel_drops == 0
    finally:
        stop_bounded(table)


def test_stop_while_idle(core: ModuleType, pair: Pair) -> None:
    rx, _, _ = pair
    table = core.HeartbeatTable(30.0, 0.1)
    table.stop_reader()  # never started: nothing to do
    table.start_reader(rx.fileno(), budget=64, flood_delay=0.001)
    time.sleep(0.05)  # let the thread block in its read
    stop_bounded(table)
    assert not table.reading
    assert table.reader_errors == 0
    table.stop_reader()  # idempotent
    assert not table.reading


def test_start_twice_then_again_on_a_new_socket(core: ModuleType, pair: Pair) -> None:
    rx, tx, _ = pair
    table = core.HeartbeatTable(30.0, 0.1)
    table.add(77, "w", 0.0)
    table.start_reader(rx, budget=64, flood_delay=0.001)
    with pytest.raises(RuntimeError):
        table.start_reader(rx, budget=64, flood_delay=0.001)
    stop_bounded(table)
    rx2 = udp_rx()
    try:
        table.start_reader(rx2, budget=64, flood_delay=0.001)
        assert table.reading
        tx.sendto(b"77;1", rx2.getsockname())
        assert wait_until(lambda: table.last_seen(77) > 0.0)
        assert table.reader_counts().heartbeats == 1
        stop_bounded(table)
    finally:
        rx2.close()


def test_idle_reader_never_wakes(core: ModuleType, pair: Pair) -> None:
    rx, _, _ = pair
    table = core.HeartbeatTable(30.0, 0.1)
    table.start_reader(rx, budget=64, flood_delay=0.001)
    try:
        time.sleep(0.3)
        assert table.reader_wakeups == 0
        assert table.reader_counts() == (0, 0, 0, 0, 0)
    finally:
        stop_bounded(table)


def test_read_error_is_counted_and_reading_goes_on(
    core: ModuleType, pair: Pair
) -> None:
    rx, _, addr = pair
    table = core.HeartbeatTable(30.0, 0.1)
    table.add(88, "w", 0.0)
    # Connected to a port nobody holds: the ICMP port-unreachable that
    # answers rx's send makes its next read fail (ECONNREFUSED).
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as gone:
        gone.bind(("127.0.0.1", 0))
        peer = gone.getsockname()
    rx.connect(peer)
    table.start_reader(rx, budget=64, flood_delay=0.001)
    try:
        rx.send(b"anyone?")
        assert wait_until(lambda: table.reader_errors == 1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as back:
            back.bind(peer)  # the peer is back: the thread still reads
            back.sendto(b"88;1", addr)
            assert wait_until(lambda: table.last_seen(88) > 0.0)
        assert table.reader_counts() == (1, 1, 0, 0, 0)
        assert table.reader_errors == 1
    finally:
        stop_bounded(table)


def test_table_dropped_while_reading(core: ModuleType) -> None:
    # The thread keeps its table alive: dropping the caller's last reference
    # frees nothing it still uses.  The socket stays open (the thread blocks
    # on it for the rest of the session, at no cost).
    rx = udp_rx()
    _KEPT.append(rx)
    table = core.HeartbeatTable(30.0, 0.1)
    table.add(55, "w", 0.0)
    table.start_reader(rx, budget=64, flood_delay=0.001)
    del table
    gc.collect()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        for _ in range(100):
            tx.sendto(b"55;1", rx.getsockname())
    time.sleep(0.05)
    gc.collect()


def test_what_the_reader_counts_as_a_flood() -> None:
    # The decision alone (the compiled twin computes the same average): a
    # steady 5,000/s is a flood at flood_delay 1 ms (5 per delay >= 4) and is
    # read every 16 datagrams (3.2 ms); 200,000/s every flood_delay; 20/ms
    # at most every LONGEST_WAIT; a fleet's 1,000/s is not a flood, nor are
    # two datagrams that came close together.
    from circus_watchdog._core_py import FLOOD_BATCH, FLOOD_READ, LONGEST_WAIT, _Flood

    def pause(gaps: list[float], delay: float = 0.001) -> float:
        flood, now, last = _Flood(delay), 0.0, 0.0
        flood._last = 0.0
        for gap in gaps:
            now += gap
            last = flood.after(1, now)
        return last

    assert (FLOOD_BATCH, FLOOD_READ, LONGEST_WAIT) == (4, 16, 0.004)
    assert pause([0.0002] * 60) == pytest.approx(0.0032, rel=0.05)  # 5,000/s
    assert pause([0.000005] * 60) == 0.001  # 200,000/s: flood_delay
    assert pause([0.0002] * 60, delay=0.005) == 0.005  # the longest is the delay
    assert pause([0.001] * 60) == 0.0  # 1,000/s
    assert pause([0.001] * 60 + [0.00001]) == 0.0  # one close pair
    assert pause([0.0002] * 60, delay=0.0) == 0.0  # batch_delay 0: never sleeps
    assert pause([0.0002] * 60 + [0.002] * 30) == 0.0  # the flood ebbed
    assert pause([0.00024] * 80) <= LONGEST_WAIT  # 4,200/s: 3.84 ms
