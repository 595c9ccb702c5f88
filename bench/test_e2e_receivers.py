"""Smoke tests of bench/e2e's receivers (not benchmarks): the C floors and the
original's receive path count exactly what they are sent, and stop on SIGTERM."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from e2e.accounting import cpu_seconds, udp_socket_stats, wait_drained
from e2e.floors import FLOORS, build, start_floor
from e2e.receivers import OriginalReceiver

SENT = 5_000
RCVBUF = 4 << 20  # bytes: room for every datagram sent below
PIDS = (1000, 1001, 1002)


@pytest.fixture(scope="module")
def floors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    try:
        return build(tmp_path_factory.mktemp("floors"))
    except RuntimeError as exc:  # no C compiler
        pytest.skip(str(exc))


def send(port: int, count: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        for i in range(count):
            tx.sendto(b"%d;1764310000.1" % PIDS[i % len(PIDS)], ("127.0.0.1", port))


@pytest.mark.parametrize("kind", FLOORS)
def test_floor_counts_every_datagram(floors: dict[str, Path], kind: str) -> None:
    floor = start_floor(floors[kind], RCVBUF)
    try:
        assert floor.rcvbuf >= 1 << 20
        send(floor.port, SENT)
        wait_drained(floor.port, limit=10)
        assert udp_socket_stats(floor.port)[1] == 0  # no kernel drop
        assert cpu_seconds(floor.pid) >= 0
    finally:
        count = floor.stop()
    assert count == SENT
    assert floor.proc.returncode == 0


def test_floor_stops_after_its_time_bound(floors: dict[str, Path]) -> None:
    exe = floors["floor_block"]
    proc = subprocess.run(
        [str(exe), "0", str(RCVBUF), "1"], capture_output=True, text=True, timeout=10
    )
    assert proc.returncode == 0
    assert proc.stdout.splitlines()[-1] == "count 0"


def test_original_counts_every_datagram() -> None:
    run = OriginalReceiver(RCVBUF, PIDS).open()
    send(run.port, SENT)
    wait_drained(run.port, limit=20)
    counted = run.finish()
    assert counted.datagrams == counted.heartbeats == SENT
