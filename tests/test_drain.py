"""drain / drain_raw over real UDP sockets on 127.0.0.1."""

from __future__ import annotations

import socket
import tracemalloc
from collections.abc import Iterator
from types import ModuleType

import pytest

from circus_watchdog.loadgen._send import send_heartbeats

RCVBUF = 8 * 1024 * 1024


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket, tuple[str, int]]]:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    rx.bind(("127.0.0.1", 0))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, RCVBUF)
    try:
        yield rx, tx, rx.getsockname()
    finally:
        rx.close()
        tx.close()


def send_all(tx: socket.socket, addr: tuple[str, int], payloads: list[bytes]) -> None:
    for p in payloads:
        tx.sendto(p, addr)


def test_drain_counts_every_kind(
    core: ModuleType, pair: tuple[socket.socket, socket.socket, tuple[str, int]]
) -> None:
    rx, tx, addr = pair
    table = core.HeartbeatTable(3.0, 0.1)
    for pid in range(1, 101):
        table.add(pid, "w", 0.0)
    payloads = []
    for i in range(300):  # several recvmmsg batches of 64
        payloads.append(b"%d;1764310000.123" % (i % 100 + 1))
    payloads += [b"%d;1" % pid for pid in range(5000, 5150)]  # unknown
    payloads += [b"garbage", b"", b"-1;1", b"0;1", b"12;" + b"x" * 3000]  # malformed
    payloads += [b"12;" + b"x" * 1022]  # 1025 bytes: malformed
    send_all(tx, addr, payloads)
    counts = table.drain(rx, 5.0, 10_000)
    assert counts == core.DrainCounts(len(payloads), 300, 150, 6)
    assert counts.datagrams == counts.heartbeats + counts.unknown + counts.malformed
    assert all(table.last_seen(pid) == 5.0 for pid in range(1, 101))
    assert len(table) == 100
    assert table.drain(rx, 6.0, 10_000) == (0, 0, 0, 0, 0)  # empty: returns at once


def test_drain_respects_budget(
    core: ModuleType, pair: tuple[socket.socket, socket.socket, tuple[str, int]]
) -> None:
    rx, tx, addr = pair
    table = core.HeartbeatTable(3.0, 0.1)
    table.add(7, "w", 0.0)
    send_all(tx, addr, [b"7;1"] * 500)
    assert table.drain(rx, 1.0, 130).datagrams == 130
    assert table.drain(rx, 1.0, 1).datagrams == 1
    assert table.drain(rx, 1.0, 1000).datagrams == 369


def test_drain_accepts_fd_and_blocking_socket(
    core: ModuleType, pair: tuple[socket.socket, socket.socket, tuple[str, int]]
) -> None:
    rx, tx, addr = pair
    assert rx.getblocking()  # MSG_DONTWAIT: a blocking socket never blocks drain
    table = core.HeartbeatTable(3.0, 0.1)
    table.add(7, "w", 0.0)
    assert table.drain(rx, 1.0, 10).datagrams == 0
    send_all(tx, addr, [b"7;1"])
    assert table.drain(rx.fileno(), 2.0, 10).heartbeats == 1


def test_drain_raw(
    core: ModuleType, pair: tuple[socket.socket, socket.socket, tuple[str, int]]
) -> None:
    rx, tx, addr = pair
    table = core.HeartbeatTable(3.0, 0.1)
    payloads = [b"pid=%d ts=1" % i for i in range(200)] + [b"y" * 1500, b""]
    send_all(tx, addr, payloads)
    got, oversized = table.drain_raw(rx, 150)
    assert got == payloads[:150] and oversized == 0
    got, oversized = table.drain_raw(rx, 150)
    assert got == payloads[150:200] + [b""] and oversized == 1


def test_unknown_pid_flood_changes_nothing(
    core: ModuleType, pair: tuple[socket.socket, socket.socket, tuple[str, int]]
) -> None:
    rx, tx, addr = pair
    table = core.HeartbeatTable(3.0, 0.1)
    for pid in range(1, 11):
        table.add(pid, "w", 0.0)
    before = sorted(table.pids())
    tracemalloc.start()
    try:
        start, _ = tracemalloc.get_traced_memory()
        unknown = 0
        for chunk in range(100):  # 100 x 2000 forged pids, drained as they come
            base = 1_000_000 + chunk * 2000
            send_heartbeats(tx, addr, list(range(base, base + 2000)))
            unknown += table.drain(rx, 1.0, 100_000).unknown
        end, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert unknown > 150_000  # loopback may drop a few under load; most arrive
    assert sorted(table.pids()) == before
    assert end - start < 64 * 1024  # nothing kept per forged pid


def test_kernel_drops_are_seen(core: ModuleType) -> None:
    so_rxq_ovfl = getattr(socket, "SO_RXQ_OVFL", 40)
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx,
    ):
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # tiny: it drops
        rx.setsockopt(socket.SOL_SOCKET, so_rxq_ovfl, 1)
        rx.bind(("127.0.0.1", 0))
        addr = rx.getsockname()
        table = core.HeartbeatTable(3.0, 0.1)
        assert table.kernel_drops == 0
        sent = send_heartbeats(tx, addr, list(range(1, 2001)))
        first = table.drain(rx, 1.0, 100_000).datagrams
        assert first < sent  # the rest was dropped by the kernel
        assert table.kernel_drops == 0  # queued before the drops: no count yet
        send_heartbeats(tx, addr, [1, 2, 3])
        assert table.drain(rx, 1.0, 100).datagrams == 3
        assert table.kernel_drops == sent - first


def test_drain_max_age(
    core: ModuleType, pair: tuple[socket.socket, socket.socket, tuple[str, int]]
) -> None:
    rx, tx, addr = pair
    table = core.HeartbeatTable(3.0, 0.1)
    table.add(7, "w", 0.0)
    wall = 1764310000.0
    send_all(
        tx,
        addr,
        [
            b"7;1764310000.5",  # fresh
            b"7;1764309995",  # 5 s old: fine with max_age 10
            b"7;1764309900",  # 100 s old: stale
            b"7;1764310100",  # 100 s in the future: stale (a replay or bad clock)
            b"7;soon",  # not a number: stale when max_age is on
            b"8;1764310000",  # fresh, unknown pid
            b"x;1764310000",  # malformed
        ],
    )
    counts = table.drain(rx, 1.0, 100, 10.0, wall)
    assert counts == core.DrainCounts(7, 2, 1, 1, 3)
    send_all(tx, addr, [b"7;1764309900", b"7;soon"])
    assert table.drain(rx, 2.0, 100).heartbeats == 2  # max_age off: no check
