"""Core benchmarks: compiled core, pure twin and circus's WatchDog side by side.

Each test is one operation; ``benchmark.group`` puts the implementations of an
operation (and size) in one table.  Figures per operation, and the ratios, are
also printed as a summary at the end of the session (see conftest.py).
"""

from __future__ import annotations

import itertools
import math
import random
import time
from typing import Any

import pytest

import memory
from report import Results, record
from support import (
    HEARTBEAT,
    SIZES,
    T0,
    TICK,
    TIMEOUT,
    Impl,
    SteadyState,
    UdpPair,
    cpu_times,
    fill_original,
    fill_table,
)

LOOPS = 1_000  # operations per round for the per-call benchmarks
BEAT_TABLE = 10_000  # monitored pids while beating
WARMUP_S = 9.0  # simulated seconds before steady-state ticks are timed
STEADY_ROUNDS = 40  # ticks timed: two 2 s re-file cycles
EMPTY_TIMEOUT = 60.0  # seconds: room for 500 consecutive empty ticks of 0.1 s
EMPTY_TICKS = 25  # ticks per round
EMPTY_ROUNDS = 20
SWEEP_ROUNDS = 10  # look_after calls timed
MEMORY_PIDS = 1_000_000
DRAIN_PID0 = 100_000
DRAIN_ROUNDS = {"count": 25, "c": 25, "py": 10, "original": 6}


def test_parse_heartbeat(benchmark: Any, impl: Impl, results: Results) -> None:
    """One default-format heartbeat to its pid; the original decodes + regexes."""
    benchmark.group = "parse"
    if impl.watchdog is not None:
        parse = impl.watchdog._decode_received_udp_message
        assert parse(HEARTBEAT)["pid"] == "12345"
    else:
        parse = impl.core.parse_heartbeat
        assert parse(HEARTBEAT) == 12345
    data = HEARTBEAT

    @benchmark
    def _run() -> None:
        for _ in range(LOOPS):
            parse(data)

    op = record(results, "parse", impl.tag, benchmark, LOOPS)
    benchmark.extra_info["ns_per_parse"] = op and op * 1e9


def test_beat(benchmark: Any, impl: Impl, results: Results) -> None:
    """A heartbeat of a monitored pid recorded in the table (no socket, no parse)."""
    benchmark.group = "beat"
    rnd = random.Random(2)
    pids = rnd.sample(range(1, BEAT_TABLE + 1), LOOPS)
    if impl.watchdog is not None:
        pid_status = impl.watchdog.pid_status
        fill_original(pid_status, range(1, BEAT_TABLE + 1))
        # What receive_udp_socket does with a decoded heartbeat, verbatim.
        beats = [{"pid": str(p), "timestamp": "1764310000.123"} for p in pids]

        @benchmark
        def _run() -> None:
            for heartbeat in beats:
                if "pid" in heartbeat:
                    if heartbeat["pid"] in pid_status:
                        pid_status[heartbeat["pid"]]["last_activity"] = time.time()

    else:
        table = impl.core.HeartbeatTable(TIMEOUT, TICK)
        fill_table(table, range(1, BEAT_TABLE + 1), T0)
        beat = table.beat
        clock = itertools.count(T0 + 1.0, 1e-3)  # each round is a little later

        @benchmark
        def _run() -> None:
            now = next(clock)
            for pid in pids:
                beat(pid, now)

        assert table.last_seen(pids[0]) > T0

    op = record(results, "beat", impl.tag, benchmark, LOOPS)
    benchmark.extra_info["ns_per_beat"] = op and op * 1e9


def _sweep(benchmark: Any, wd: Any, npids: int) -> None:
    """The original's loop: look_after over npids fresh pids (no kill)."""
    fill_original(wd.pid_status, range(1, npids + 1))
    benchmark.pedantic(wd.look_after, rounds=SWEEP_ROUNDS)
    assert len(wd.pid_status) == npids and not wd.casts


@pytest.mark.parametrize("size", list(SIZES))
def test_tick_steady(benchmark: Any, impl: Impl, size: str, results: Results) -> None:
    """One tick (``expire``) with every pid beating once a second, none expiring.

    Only the ``expire`` call is timed: pedantic rounds whose untimed setup
    applies the beats due before the tick (see support.SteadyState).
    """
    npids = SIZES[size]
    group = benchmark.group = f"tick-steady-{size}"
    if impl.watchdog is not None:
        _sweep(benchmark, impl.watchdog, npids)
    else:
        table = impl.core.HeartbeatTable(TIMEOUT, TICK)
        sim = SteadyState(table, npids)
        for _ in range(round(WARMUP_S / TICK)):
            assert not table.expire(sim.step())

        def setup() -> tuple[tuple[float], dict[str, Any]]:
            return (sim.step(),), {}

        benchmark.pedantic(table.expire, setup=setup, rounds=STEADY_ROUNDS)
        assert len(table) == npids  # nothing expired
        benchmark.extra_info["simulated_s"] = sim.k * TICK
    op = record(results, group, impl.tag, benchmark, 1)
    benchmark.extra_info["us_per_tick"] = op and op * 1e6


@pytest.mark.parametrize("size", list(SIZES))
def test_tick_nothing_filed(
    benchmark: Any, impl: Impl, size: str, results: Results
) -> None:
    """A tick whose buckets are empty: every pid is due later.

    All pids are added at once (as at start-up discovery), so they are all
    filed in one bucket ``EMPTY_TIMEOUT`` ahead; each round times
    ``EMPTY_TICKS`` consecutive ticks before it, so the timer's own overhead
    (~0.15 us a round) is spread thin.  The original has no such thing: its
    loop is always a full sweep.
    """
    npids = SIZES[size]
    group = benchmark.group = f"tick-nothing-filed-{size}"
    if impl.watchdog is not None:
        _sweep(benchmark, impl.watchdog, npids)
        op = record(results, group, impl.tag, benchmark, 1)
    else:
        table = impl.core.HeartbeatTable(EMPTY_TIMEOUT, TICK)
        base = math.floor(T0 / TICK)

        def at(k: int) -> float:  # a quarter into tick k: clear of float rounding
            return (base + k + 0.25) * TICK

        fill_table(table, range(1, npids + 1), at(0))
        assert not table.expire(at(0))
        ticks = itertools.count(1)
        assert (EMPTY_ROUNDS * EMPTY_TICKS + 2) * TICK < EMPTY_TIMEOUT

        def setup() -> tuple[tuple[list[float]], dict[str, Any]]:
            return ([at(next(ticks)) for _ in range(EMPTY_TICKS)],), {}

        expire = table.expire

        def _run(nows: list[float]) -> None:
            for now in nows:
                expire(now)

        benchmark.pedantic(_run, setup=setup, rounds=EMPTY_ROUNDS)
        assert len(table) == npids
        op = record(results, group, impl.tag, benchmark, EMPTY_TICKS)
    benchmark.extra_info["us_per_tick"] = op and op * 1e6


def test_memory_per_pid(benchmark: Any, impl: Impl, results: Results) -> None:
    """Bytes per monitored pid at 1M pids (tracemalloc), and the time to add them.

    The bytes are in ``extra_info`` and the summary; the timed part is one fill
    of 1M pids without tracemalloc.
    """
    benchmark.group = "memory-1M"
    npids = 100_000 if benchmark.disabled else MEMORY_PIDS  # smoke runs are quick
    fp = memory.measure(impl.tag, npids)
    benchmark.extra_info.update(
        npids=npids, bytes_per_pid=fp.per_pid, peak_bytes_per_pid=fp.peak_per_pid
    )
    results.add("memory", impl.tag, npids=npids, bytes_per_pid=fp.per_pid)
    pids = range(1, npids + 1)
    if impl.watchdog is not None:
        wd = impl.watchdog
        benchmark.pedantic(fill_original, args=(wd.pid_status, pids), rounds=1)
        assert len(wd.pid_status) == npids
    else:
        table = impl.core.HeartbeatTable(TIMEOUT, TICK)
        benchmark.pedantic(fill_table, args=(table, pids, T0), rounds=1)
        assert len(table) == npids


@pytest.mark.benchmark(group="drain-cpu", timer=time.process_time)
def test_drain_cpu(
    benchmark: Any, receiver: Impl, udp_pair: UdpPair, results: Results
) -> None:
    """CPU time (user + system) to drain a backlog of heartbeats of known pids.

    The timer is ``time.process_time``; each round's untimed setup refills the
    receive queue with ``backlog`` heartbeats (sendmmsg on 127.0.0.1).
    """
    n = udp_pair.backlog
    pids = range(DRAIN_PID0, DRAIN_PID0 + n)
    rx = udp_pair.rx
    fd = rx.fileno()
    if receiver.count_drain is not None:
        count_drain = receiver.count_drain

        def target() -> int:
            return count_drain(fd, n)

    elif receiver.watchdog is not None:
        wd = receiver.watchdog
        fill_original(wd.pid_status, pids)
        wd.sock = rx  # non-blocking; the plugin itself sets a 1 s timeout
        receive = wd.receive_udp_socket
        stamps = [wd.pid_status[str(p)]["last_activity"] for p in pids[:: n // 8]]

        def target() -> int:
            for _ in range(n):
                receive(fd, 1)
            return n

    else:
        table = receiver.core.HeartbeatTable(TIMEOUT, TICK)
        fill_table(table, pids, T0)

        def target() -> int:
            counts = table.drain(rx, T0 + 1.0, n)
            assert counts.heartbeats == counts.datagrams
            return counts.datagrams

    drained: list[int] = []
    user = system = 0.0

    def run() -> None:
        nonlocal user, system
        u0, s0 = cpu_times()
        drained.append(target())
        u1, s1 = cpu_times()
        user += u1 - u0
        system += s1 - s0

    def setup() -> None:
        udp_pair.flush()
        udp_pair.fill(pids)

    rounds = DRAIN_ROUNDS[receiver.tag]
    benchmark.pedantic(run, setup=setup, rounds=rounds)
    assert drained and all(d == n for d in drained), drained
    if receiver.watchdog is not None:
        status = receiver.watchdog.pid_status
        after = [status[str(p)]["last_activity"] for p in pids[:: n // 8]]
        assert all(a > b for a, b in zip(after, stamps, strict=True))
    op = record(results, "drain", receiver.tag, benchmark, n, backlog=n)
    count = results.get("drain", "count")
    benchmark.extra_info.update(
        backlog=n,
        rcvbuf=udp_pair.rcvbuf,
        capacity=udp_pair.capacity,
        us_cpu_per_datagram=op and op * 1e6,
        sys_share=system / (user + system) if user + system else None,
        ratio_to_count=op / count if op and count else None,
    )
