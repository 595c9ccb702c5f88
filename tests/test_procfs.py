"""procfs: every /proc reader, on a fake /proc tree and on real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from circus_watchdog import client, procfs
from procs import fake_stat

pytestmark = pytest.mark.skipif(
    not os.path.isdir("/proc/self"), reason="compares with the real /proc (Linux)"
)


def test_stat_on_a_fake_tree(tmp_path: Path) -> None:
    fake_stat(tmp_path, 10, cpu_ticks=3 * procfs.CLK_TCK, start=99)
    root = str(tmp_path)
    fields = procfs.stat_fields(10, root)
    assert fields is not None and fields[0] == b"S"  # after "(a b) c)"
    assert procfs.read_stat(10, root) == procfs.ProcStat(
        "S", 3.0, 3, 25 * procfs.PAGE, 99
    )
    assert procfs.parent_pid(10, root) == 0
    (tmp_path / "10" / "stat").write_text("10 (x) S 1 2")  # cut short
    assert procfs.read_stat(10, root) is None
    assert procfs.parent_pid(10, root) == 1
    (tmp_path / "10" / "stat").write_text("no parenthesis at all")
    assert procfs.stat_fields(10, root) is None
    assert procfs.parent_pid(10, root) is None


READERS: list[Callable[[int, str], object]] = [
    procfs.stat_fields,
    procfs.read_stat,
    procfs.parent_pid,
    procfs.read_wchan,
    procfs.count_fds,
    procfs.cwd,
    procfs.cmdline,
]


@pytest.mark.parametrize("reader", READERS, ids=lambda r: r.__name__)
def test_every_reader_says_none_when_it_cannot_read(
    reader: Callable[[int, str], object], tmp_path: Path
) -> None:
    (tmp_path / "7").mkdir()  # a pid whose entries are all missing
    (tmp_path / "8").write_text("")  # not a directory
    for pid in (7, 8, 9, -1, 2**64):
        assert reader(pid, str(tmp_path)) is None
    assert reader(1, str(tmp_path / "none")) is None  # no /proc at all
    assert reader(1, "/proc\0") is None  # a path open() refuses


def test_readers_of_this_process() -> None:
    me = os.getpid()
    assert procfs.parent_pid(me) == os.getppid()
    assert procfs.cwd(me) == os.getcwd()
    assert (
        procfs.cmdline(me)
        == [
            os.fsdecode(a) for a in Path("/proc/self/cmdline").read_bytes().split(b"\0")
        ][:-1]
    )
    stat = procfs.read_stat(me)
    assert stat is not None and stat.state == "R" and stat.threads >= 1
    fds = procfs.own_fds()
    assert fds is not None and {0, 1, 2} <= set(fds)
    with open(os.devnull) as extra:
        after = procfs.own_fds()
        assert after is not None and extra.fileno() in after
    count = procfs.count_fds(me)
    assert count is not None and count >= 3


def test_wchan_of_a_sleeping_child() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        for _ in range(200):  # until it sleeps
            stat = procfs.read_stat(child.pid)
            if stat is not None and stat.state == "S":
                break
            time.sleep(0.02)
        wchan = procfs.read_wchan(child.pid)
        # Kernels hide wchan from unprivileged readers as "0": None then.
        assert wchan is None or (wchan and wchan != "0")
    finally:
        child.kill()
        child.wait(30)


@pytest.mark.parametrize(
    "alive", [procfs.alive, client._alive], ids=["procfs", "client"]
)
def test_alive_live_zombie_and_gone(alive: Callable[[int], bool]) -> None:
    """procfs.alive and the vendorable client's copy agree (a zombie is gone)."""
    assert alive(os.getpid())
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    for _ in range(200):  # until it exits; not reaped yet, so a zombie
        stat = procfs.read_stat(proc.pid)
        if stat is not None and stat.state == "Z":
            break
        time.sleep(0.02)
    assert not alive(proc.pid)
    proc.wait()
    assert not alive(proc.pid)
