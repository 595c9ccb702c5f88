"""The sd_notify Unix socket on a real circusd: ``notify_access``, and the
descriptors a notifier passes along.

notify_access: a watcher's shell script, running as a non-root user, sends
``systemd-notify WATCHDOG=1``.  The message comes from the ``systemd-notify``
child, not from the shell that circus monitors: with ``notify_access = all``
it counts for the shell, with ``main`` it is an unknown pid and the shell is
killed.  Passed descriptors: the daemon closes every one it receives.
"""

from __future__ import annotations

import grp
import os
import pwd
import select
import shlex
import socket
import time
import uuid
from collections.abc import Callable

import pytest

from support import SLEEPER, Circusd, Standalone, kills, metric, wait_for, wait_pids

SYSTEMD_NOTIFY = "/usr/bin/systemd-notify"
USER, GROUP = "nobody", "nogroup"
LOOP_RATE = 1.0  # seconds
MAX_COUNT = 2
TIMEOUT = LOOP_RATE * MAX_COUNT
SLACK = 2.0  # seconds for the kill round trip and circusd's bookkeeping


def _missing() -> str | None:
    if not os.path.exists(SYSTEMD_NOTIFY):
        return f"{SYSTEMD_NOTIFY} is not installed (Debian package systemd)"
    if os.geteuid() != 0:
        return "circusd must run as root to start a watcher as another user"
    try:
        pwd.getpwnam(USER)
        grp.getgrnam(GROUP)
    except KeyError:
        return f"no user {USER} or group {GROUP}"
    return None


needs_notify = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))

# A shell loop as a watcher's script would have it, bounded so it ends even if
# circusd dies without stopping it.  systemd-notify waits for its BARRIER=1
# pipe to close after each message: that the loop keeps up shows it does.
SCRIPT = (
    f"i=0; while [ $i -lt 600 ]; do {SYSTEMD_NOTIFY} WATCHDOG=1; "
    "sleep 0.2; i=$((i+1)); done"
)


def sections(socket_name: str) -> str:
    # An abstract socket (@name): a user without access to the test's
    # directories can still reach it.
    return (
        f"[watcher:notifier]\ncmd = /bin/sh -c {shlex.quote(SCRIPT)}\n"
        f"numprocesses = 1\nuid = {USER}\ngid = {GROUP}\nworking_dir = /\n\n"
        f"[env:notifier]\nNOTIFY_SOCKET = @{socket_name}\n"
        "PATH = /usr/bin:/bin\n"
    )


def start(
    circusd_factory: Callable[..., Circusd],
    standalone: Callable[..., Standalone],
    access: str,
) -> tuple[Circusd, Standalone, int]:
    name = f"circus-watchdog-test-{uuid.uuid4().hex}"
    circusd = circusd_factory(sections(name))
    shell = wait_pids(circusd, {"notifier": 1})["notifier"][0]
    wd = standalone(
        circusd,
        *("--loop-rate", str(LOOP_RATE), "--max-count", str(MAX_COUNT)),
        *("--unix-socket", f"@{name}", "--port", "0", "--notify-access", access),
        core=None,
    )
    with open(f"/proc/{shell}/status") as status:
        uid = next(line for line in status if line.startswith("Uid:")).split()[1]
    assert int(uid) == pwd.getpwnam(USER).pw_uid  # really not root
    return circusd, wd, shell


@needs_notify
def test_notify_access_all_keeps_the_shell_alive(
    circusd_factory: Callable[..., Circusd],
    standalone: Callable[..., Standalone],
) -> None:
    circusd, wd, shell = start(circusd_factory, standalone, "all")
    time.sleep(2 * TIMEOUT + SLACK)
    assert circusd.pids("notifier") == [shell], wd.tail()
    series = wd.metrics()
    assert metric(series, "heartbeats_total") >= 2 * TIMEOUT / 0.2 / 2, wd.tail()
    assert kills(series) == {}
    assert shell in wd.monitored()


@needs_notify
def test_notify_access_main_kills_the_shell(
    circusd_factory: Callable[..., Circusd],
    standalone: Callable[..., Standalone],
) -> None:
    circusd, wd, shell = start(circusd_factory, standalone, "main")
    circusd.wait_for(lambda: shell not in circusd.pids("notifier"), TIMEOUT + SLACK + 3)
    # The kill counts once verified (the pid gone), a moment after circusd's list.
    wait_for(lambda: kills(wd.metrics()).get("notifier", 0) >= 1, 5)
    series = wd.metrics()
    assert metric(series, "unknown_pid_total") > 0  # systemd-notify's own pid
    assert metric(series, "heartbeats_total") == 0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_daemon_closes_passed_descriptors(
    circusd_factory: Callable[..., Circusd],
    standalone: Callable[..., Standalone],
    core_tag: str,
) -> None:
    name = f"circus-watchdog-test-{uuid.uuid4().hex}"
    circusd = circusd_factory(f"[watcher:idle]\ncmd = {SLEEPER}\nnumprocesses = 1\n")
    wait_pids(circusd, {"idle": 1})
    wd = standalone(circusd, "--unix-socket", f"@{name}", "--port", "0", core=core_tag)
    before = open_fds(wd.proc.pid)
    with (
        open(os.devnull, "rb") as null,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as tx,
    ):
        tx.connect(f"\0{name}")
        tx.settimeout(5)  # the queue holds 10: each send waits for the drain
        for i in range(2000):
            socket.send_fds(tx, [b"WATCHDOG=1"], [null.fileno()] * (1 + i % 3))
        # sd_notify_barrier(3): the daemon has read everything sent before
        # once the pipe sent last reads EOF.
        r, w = os.pipe()
        try:
            socket.send_fds(tx, [b"BARRIER=1"], [w])
            os.close(w)
            w = -1
            assert select.select([r], [], [], 5)[0] == [r], wd.tail()
            assert os.read(r, 1) == b""
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)
    # What the daemon opens on its own (a /metrics connection) comes and goes.
    wait_for(lambda: open_fds(wd.proc.pid) <= before, 5)
    assert metric(wd.metrics(), "unknown_pid_total") == 2000  # this test's pid
