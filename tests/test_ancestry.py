"""monitored_ancestor over real processes: /proc/PID/stat parent chains."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from circus_watchdog.ancestry import monitored_ancestor
from circus_watchdog.procfs import parent_pid

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/self/stat"), reason="needs Linux /proc"
)


@pytest.fixture
def family() -> Iterator[tuple[int, int]]:
    """(child, grandchild): a shell we started and a sleep it started."""
    child = subprocess.Popen(
        ["/bin/sh", "-c", "sleep 30 & echo $!; wait"],
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        grandchild = int(child.stdout.readline())
        yield child.pid, grandchild
    finally:
        subprocess.run(["kill", str(grandchild)], check=False)
        child.wait(timeout=30)
        if child.stdout is not None:
            child.stdout.close()


def test_parent_pid(family: tuple[int, int]) -> None:
    child, grandchild = family
    assert parent_pid(grandchild) == child
    assert parent_pid(child) == os.getpid()
    assert parent_pid(os.getpid()) == os.getppid()
    assert parent_pid(1) == 0  # init has no parent


def test_nearest_monitored_ancestor(family: tuple[int, int]) -> None:
    child, grandchild = family
    me = os.getpid()
    assert monitored_ancestor(grandchild, {child, me}.__contains__) == child
    assert monitored_ancestor(grandchild, {me}.__contains__) == me
    assert monitored_ancestor(grandchild, {me}.__contains__, max_depth=1) == 0
    assert monitored_ancestor(grandchild, {me}.__contains__, max_depth=2) == me
    # The pid itself is no ancestor of its own.
    assert monitored_ancestor(grandchild, {grandchild}.__contains__) == 0


def test_depth_is_bounded(family: tuple[int, int]) -> None:
    _, grandchild = family
    asked: list[int] = []

    def never(pid: int) -> bool:
        asked.append(pid)
        return False

    assert monitored_ancestor(grandchild, never, max_depth=3) == 0
    assert len(asked) <= 3
    asked.clear()
    assert monitored_ancestor(grandchild, never) == 0  # up to init: ends at 0
    assert 2 <= len(asked) <= 16 and 0 not in asked


def test_gone_and_bad_pids_are_none() -> None:
    gone = subprocess.Popen(["true"])
    gone.wait(timeout=30)  # reaped: /proc/PID is gone (unless reused at once)
    if not os.path.exists(f"/proc/{gone.pid}"):
        assert monitored_ancestor(gone.pid, lambda pid: True) == 0
    for bad in (0, -1, 2**31, 2**64):
        assert parent_pid(bad) is None
        assert monitored_ancestor(bad, lambda pid: True) == 0


def test_command_name_with_parentheses(tmp_path: Path) -> None:
    # A process names itself: COMM may hold ") S 1 (" to fool a parser that
    # stops at the first ")".
    tricky = tmp_path / "a) S 1 (b"
    tricky.symlink_to(sys.executable)
    proc = subprocess.Popen(
        [str(tricky), "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        with open(f"/proc/{proc.pid}/stat", "rb") as f:
            assert b"(a) S 1 (b)" in f.read()
        assert parent_pid(proc.pid) == os.getpid()
        assert monitored_ancestor(proc.pid, {os.getpid()}.__contains__) == os.getpid()
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)
