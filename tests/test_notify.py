"""sd_notify over a Unix socket: the pid comes from the kernel, not the payload."""

from __future__ import annotations

import os
import select
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


# -- descriptors passed with a datagram (SCM_RIGHTS) ---------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def send_with_fds(path: str, payload: bytes, fds: list[int]) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as tx:
        tx.connect(path)  # socket.send_fds ignores its address argument
        socket.send_fds(tx, [payload], fds)


def test_passed_descriptors_are_closed_at_once(
    core: ModuleType, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    table = core.HeartbeatTable(3.0, 0.1)
    table.add(os.getpid(), "me", 0.0)
    payloads = [b"WATCHDOG=1", b"BARRIER=1", b"junk", b"READY=1\nWATCHDOG=1"]
    with (
        open(os.devnull, "rb") as null,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as tx,
    ):
        tx.connect(path)
        before = open_fds()
        heartbeats = datagrams = 0
        for round_ in range(500):  # 500 x 8 = 4000 datagrams, 4500 descriptors
            for i in range(8):  # below net.unix.max_dgram_qlen (10)
                fds = [null.fileno()] * (2 if i == 0 else 1)
                socket.send_fds(tx, [payloads[(round_ + i) % 4]], fds)
            counts = table.drain_notify(sock, 1.0, 100)
            heartbeats += counts.heartbeats
            datagrams += counts.datagrams
        after = open_fds()
    assert datagrams == 4000
    assert heartbeats == 2000
    assert after == before
    assert table.control_truncated == 0


@pytest.mark.parametrize("method", ["drain", "drain_raw"])
def test_heartbeat_drains_close_passed_descriptors(
    core: ModuleType, method: str
) -> None:
    rx, tx = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with rx, tx, open(os.devnull, "rb") as null:
        table = core.HeartbeatTable(3.0, 0.1)
        table.add(12, "w", 0.0)
        before = open_fds()
        for _ in range(200):
            for _ in range(8):
                socket.send_fds(tx, [b"12;1"], [null.fileno()])
            if method == "drain":
                assert table.drain(rx, 1.0, 100).heartbeats == 8
            else:
                assert len(table.drain_raw(rx, 100)[0]) == 8
        assert open_fds() == before


def test_barrier_client_returns_at_once(
    core: ModuleType, notify_socket: tuple[socket.socket, str]
) -> None:
    # sd_notify_barrier(3): BARRIER=1 with the write end of a pipe attached;
    # the client waits until the read end sees EOF, i.e. the receiver closed it.
    sock, path = notify_socket
    table = core.HeartbeatTable(3.0, 0.1)
    r, w = os.pipe()
    try:
        send_with_fds(path, b"BARRIER=1", [w])
        os.close(w)
        w = -1
        assert table.drain_notify(sock, 1.0, 10) == core.DrainCounts(1, 0, 0, 0)
        readable, _, _ = select.select([r], [], [], 1.0)
        assert readable == [r]
        assert os.read(r, 1) == b""  # EOF: no write end is left open
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_truncated_control_data_is_counted(
    core: ModuleType, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    table = core.HeartbeatTable(3.0, 0.1)
    table.add(os.getpid(), "me", 0.0)
    with open(os.devnull, "rb") as null:
        before = open_fds()
        # Room for the credentials and 38 descriptors (docs/security.md).
        send_with_fds(path, b"WATCHDOG=1", [null.fileno()] * 38)  # fits
        send_with_fds(path, b"WATCHDOG=1", [null.fileno()] * 39)  # does not
        send_with_fds(path, b"WATCHDOG=1", [null.fileno()] * 250)
        send_with_fds(path, b"WATCHDOG=1", [])
        counts = table.drain_notify(sock, 2.0, 10)
        assert open_fds() == before
    # The credentials come first (unix(7)), so even a truncated datagram
    # names its sender.
    assert counts == core.DrainCounts(4, 4, 0, 0)
    assert table.control_truncated == 2


# -- notify_access=all: a sender's monitored ancestor (resolve) -----------------


def test_drain_notify_resolve(
    core: ModuleType, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    me = os.getpid()
    calls: list[int] = []
    answers = {"ancestor": 77, "none": 0, "unmonitored": 78, "bogus": 2**40}

    def make(answer: str):  # type: ignore[no-untyped-def]
        def resolve(pid: int) -> int:
            calls.append(pid)
            return answers[answer]

        return resolve

    table = core.HeartbeatTable(3.0, 0.1)
    table.add(77, "w", 0.0)
    send(path, b"WATCHDOG=1", b"READY=1", b"junk", b"WATCHDOG=1")
    assert table.drain_notify(sock, 5.0, 100, make("ancestor")) == (4, 2, 0, 1, 0)
    assert calls == [me, me]  # once per heartbeat datagram, not for READY/junk
    assert table.last_seen(77) == 5.0
    for answer in ("none", "unmonitored", "bogus"):
        send(path, b"WATCHDOG=1")
        assert table.drain_notify(sock, 6.0, 100, make(answer)) == (1, 0, 1, 0, 0)
    assert table.last_seen(77) == 5.0
    calls.clear()
    table.add(me, "me", 0.0)  # a monitored sender is never resolved
    send(path, b"WATCHDOG=1")
    assert table.drain_notify(sock, 7.0, 100, make("ancestor")).heartbeats == 1
    assert calls == []
    assert table.last_seen(me) == 7.0 and table.last_seen(77) == 5.0


def test_resolve_error_still_closes_descriptors(
    core: ModuleType, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    table = core.HeartbeatTable(3.0, 0.1)

    def broken(pid: int) -> int:
        raise RuntimeError("resolve must not raise")

    r, w = os.pipe()
    try:
        send(path, b"WATCHDOG=1")
        send_with_fds(path, b"BARRIER=1", [w])
        os.close(w)
        w = -1
        with pytest.raises(RuntimeError):
            table.drain_notify(sock, 1.0, 10, broken)
        table.drain_notify(sock, 1.0, 10)  # the pure core reads one at a time
        assert select.select([r], [], [], 1.0)[0] == [r]
        assert os.read(r, 1) == b""
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_security_doc_notify_access_snippet(tmp_path: Path) -> None:
    from circus_watchdog.circus_ini import read_circus_ini
    from circus_watchdog.config import Config

    doc = (Path(__file__).resolve().parent.parent / "docs" / "security.md").read_text()
    blocks = [b.split("```", 1)[0] for b in doc.split("```ini\n")[1:]]
    (snippet,) = [b for b in blocks if "notify_access" in b]
    ini = tmp_path / "circus.ini"
    ini.write_text(snippet)
    options = read_circus_ini(str(ini), "plugin:watchdog").options
    config = Config.from_options(options)
    assert config.notify_access == "all"
    assert config.unix_socket == "/run/circus-watchdog.sock"
