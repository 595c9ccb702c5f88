"""pids.alive and the vendorable client's copy agree (a zombie is gone)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from circus_watchdog import client, pids


@pytest.mark.parametrize("alive", [pids.alive, client._alive], ids=["pids", "client"])
def test_alive_live_zombie_and_gone(alive: Callable[[int], bool]) -> None:
    assert alive(os.getpid())
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    for _ in range(200):  # until it exits; not reaped yet, so a zombie
        with open(f"/proc/{proc.pid}/stat", "rb") as stat:
            if stat.read().rsplit(b")", 1)[-1].split()[0] == b"Z":
                break
        time.sleep(0.02)
    assert not alive(proc.pid)
    proc.wait()
    assert not alive(proc.pid)


def test_the_client_copy_of_pid_max_agrees() -> None:
    assert client.PID_MAX == pids.PID_MAX


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (1, True),
        (2**31 - 1, True),
        (0, False),
        (2**31, False),
        (True, False),
        ("1", False),
    ],
)
def test_is_pid(value: object, ok: bool) -> None:
    assert pids.is_pid(value) is ok
