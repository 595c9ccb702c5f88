"""sockets: binding the heartbeat sockets, and inherited_unix_socket, the
sd_notify socket taken from circusd (fast, real sockets)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from circus_watchdog.config import Config
from circus_watchdog.sockets import (
    SO_RXQ_OVFL,
    bind_udp,
    bind_unix,
    inherited_unix_socket,
    is_socket,
    set_rcvbuf,
)
from support import free_udp_port


@pytest.fixture
def path(tmp_path: Path) -> Iterator[str]:
    yield str(tmp_path / "wd.sock")


def bound(path: str, kind: int = socket.SOCK_DGRAM) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, kind)
    sock.bind(path)
    return sock


def test_found_when_inheritable_and_bound_there(path: str) -> None:
    with bound(path) as theirs:
        theirs.set_inheritable(True)
        found = inherited_unix_socket(path)
        assert found is not None
        try:
            assert found.fileno() == theirs.fileno()  # adopted, not a copy
            assert found.getblocking() is False
            assert found.get_inheritable() is False  # not passed further
            assert found.getsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED) == 1
        finally:
            found.detach()  # theirs closes it


@pytest.mark.parametrize(
    "case", ["not inheritable", "other path", "stream socket", "udp socket"]
)
def test_others_are_left_alone(path: str, tmp_path: Path, case: str) -> None:
    """Only an inherited datagram socket bound to the path; the rest stay open."""
    if case == "udp socket":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
    elif case == "stream socket":
        sock = bound(path, socket.SOCK_STREAM)
    elif case == "other path":
        sock = bound(str(tmp_path / "other.sock"))
    else:
        sock = bound(path)
    with sock:
        if case != "not inheritable":
            sock.set_inheritable(True)
        assert inherited_unix_socket(path) is None
        os.fstat(sock.fileno())  # still open


def test_abstract_name(path: str) -> None:
    name = f"circus-watchdog-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as theirs:
        theirs.bind("\0" + name)
        theirs.set_inheritable(True)
        found = inherited_unix_socket("@" + name)
        assert found is not None
        found.detach()
        assert inherited_unix_socket(path) is None


CHILD = """
import json, sys
from circus_watchdog.sockets import inherited_unix_socket
sock = inherited_unix_socket(sys.argv[1])
data = sock.recv(100) if sock is not None else b""
print(json.dumps([sock is not None, data.decode()]))
"""


def test_a_child_process_adopts_the_socket_it_inherits(path: str) -> None:
    """As circusd hands a ``[socket:NAME]`` to a ``use_sockets`` plugin: a
    datagram queued before the child started is read by the child."""
    with bound(path) as parent, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as c:
        c.connect(path)
        c.send(b"WATCHDOG=1")
        out = subprocess.run(
            [sys.executable, "-c", CHILD, path],
            pass_fds=[parent.fileno()],
            capture_output=True,
            timeout=30,
            check=True,
        ).stdout
    assert json.loads(out) == [True, "WATCHDOG=1"]


# -- binding -----------------------------------------------------------------


def test_is_socket(path: str, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with bound(path):
        assert is_socket(path)
    assert not is_socket(str(tmp_path / "file"))
    assert not is_socket(str(tmp_path / "none"))


def test_bind_unix_replaces_a_stale_socket_never_a_file(
    path: str, tmp_path: Path
) -> None:
    bound(path).close()  # a previous run's socket, left behind
    config = Config.from_options({"unix_socket": path, "rcvbuf": "64K"})
    with bind_unix(config) as sock:
        assert sock.getsockname() == path and sock.getblocking() is False
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED) == 1
        assert os.stat(path).st_mode & 0o777 == 0o666
    plain = tmp_path / "plain"
    plain.write_text("keep me")
    with pytest.raises(OSError, match=f"cannot bind unix_socket {plain}"):
        bind_unix(Config.from_options({"unix_socket": str(plain)}))
    assert plain.read_text() == "keep me"


def test_bind_udp_sees_drops_and_names_a_taken_port() -> None:
    port = free_udp_port()
    config = Config.from_options({"port": str(port), "rcvbuf": "64K"})
    with bind_udp(config) as sock:
        assert sock.getsockname() == ("127.0.0.1", port)
        assert sock.getsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL) == 1
        with pytest.raises(OSError, match=f"ip 127.0.0.1 port {port}: "):
            bind_udp(config)


def test_set_rcvbuf_returns_what_the_kernel_granted() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        granted = set_rcvbuf(sock, 64 * 1024)
        assert granted == sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2
        assert granted > 0
