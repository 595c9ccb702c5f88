"""sd_notify over a Unix socket: the pid comes from the kernel, not the payload."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.skipif(
    not hasattr(socket, "SO_PASSCRED"), reason="SO_PASSCRED is Linux only"
)


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.bind(path)
    try:
        yield sock, path
    finally:
        sock.close()


def send(path: str, *payloads: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as tx:
        for payload in payloads:
            tx.sendto(payload, path)


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"WATCHDOG=1", 1),
        (b"WATCHDOG=1\n", 1),
        (b"READY=1\nWATCHDOG=1\nSTATUS=ok", 1),
        (b"READY=1", 0),
        (b"STATUS=all good\nMAINPID=1", 0),
        (b"WATCHDOG=trigger", 0),
        (b"WATCHDOG=10", 0),
        (b"", -1),
        (b"\n\n", -1),
        (b"12;1", -1),
        (b"=1", -1),
        (b"==", -1),  # found by the fuzzer: the name before the first = is empty
        (b"WATCHDOG=1\ngarbage", -1),
    ],
)
def test_notify_kind(core: ModuleType, data: bytes, kind: int) -> None:
    assert core.notify_kind(data) == kind


def test_drain_notify_uses_kernel_credentials(
    core: ModuleType, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    table = core.HeartbeatTable(3.0, 0.1)
    table.add(os.getpid(), "me", 0.0)
    send(path, b"WATCHDOG=1", b"READY=1", b"junk", b"x" * 2000)
    counts = table.drain_notify(sock, 5.0, 100)
    assert counts == core.DrainCounts(4, 1, 0, 2)  # READY=1: only a datagram
    assert table.last_seen(os.getpid()) == 5.0


def test_another_process_cannot_beat_for_us(
    core: ModuleType, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    table = core.HeartbeatTable(3.0, 0.1)
    table.add(os.getpid(), "me", 0.0)
    me = os.getpid()
    forger = (
        "import socket, sys; s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); "
        f"[s.sendto(p, {path!r}) for p in "
        f"(b'WATCHDOG=1', b'MAINPID={me}\\nWATCHDOG=1', b'{me};1')]"
    )
    subprocess.run([sys.executable, "-c", forger], check=True, timeout=30)
    counts = table.drain_notify(sock, 5.0, 100)
    assert counts == core.DrainCounts(3, 0, 2, 1)  # the forger's own pid: unknown
    assert table.last_seen(me) == 0.0


def test_drain_notify_budget_and_fd(
    core: ModuleType, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    table = core.HeartbeatTable(3.0, 0.1)
    table.add(os.getpid(), "me", 0.0)
    # A Unix datagram queue holds net.unix.max_dgram_qlen (default 10) messages;
    # a blocking sender waits beyond that, so stay below it.
    send(path, *[b"WATCHDOG=1"] * 8)
    assert table.drain_notify(sock.fileno(), 1.0, 5).heartbeats == 5
    assert table.drain_notify(sock, 2.0, 100).heartbeats == 3
    assert table.drain_notify(sock, 3.0, 100).datagrams == 0


@pytest.mark.c_extension
def test_notify_twins_agree() -> None:
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    from circus_watchdog import _core_c, _core_py

    @hypothesis.given(
        st.one_of(
            st.binary(max_size=64),
            st.lists(
                st.sampled_from([b"WATCHDOG=1", b"READY=1", b"", b"=", b"X", b"A=b"])
            ).map(b"\n".join),
        )
    )
    def agree(data: bytes) -> None:
        assert _core_c.notify_kind(data) == _core_py.notify_kind(data)

    agree()
