"""Evidence before a kill (evidence.py, policy.judge, procfs.read_sched): on a
fake /proc tree, and on real processes (asleep, spinning, ptrace-stopped,
starved at SCHED_IDLE among CPU hogs)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from circus_watchdog import procfs
from circus_watchdog.evidence import MIN_WINDOW, Examiner, checks_off
from circus_watchdog.policy import LONGEST_WINDOW, STARVED_RATIO, judge
from circus_watchdog.procfs import Sched, read_sched
from procs import BOUND, Children, fake_stat, state_of
from support import wait_for

linux_only = pytest.mark.skipif(
    not procfs.sched_info(), reason="needs /proc/PID/schedstat (Linux)"
)


@pytest.fixture
def spawn() -> Iterator[Children]:
    with Children() as children:
        yield children


def fake_task(
    proc: Path,
    pid: int,
    tid: int,
    ran_ns: int,
    waited_ns: int,
    state: str = "S",
    tracer: int = 0,
) -> None:
    """One thread of a fake process: schedstat, stat (state) and status."""
    task = proc / str(pid) / "task" / str(tid)
    task.mkdir(parents=True, exist_ok=True)
    (task / "schedstat").write_text(f"{ran_ns} {waited_ns} 5\n")
    (task / "stat").write_text(f"{tid} (w) {state} " + " ".join(["0"] * 40))
    (task / "status").write_text(f"Name:\tw\nState:\t{state}\nTracerPid:\t{tracer}\n")


def fake_proc(tmp_path: Path) -> Path:
    (tmp_path / "self").mkdir()
    (tmp_path / "self" / "schedstat").write_text("1 2 3\n")
    (tmp_path / "pressure").mkdir()
    (tmp_path / "pressure" / "cpu").write_text(
        "some avg10=64.20 avg60=50.00 avg300=10.00 total=1\n"
        "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
    )
    return tmp_path


def sched(
    at: float, ran: float, waited: float, tracer: int = 0, runnable: bool = False
) -> Sched:
    return Sched(at, ran, waited, 0.0, 7, tracer, runnable)


# -- the judge, on plain numbers ---------------------------------------------------


def test_judge_asleep_and_spinning_are_killed() -> None:
    assert judge(sched(0, 1, 1), sched(1, 1, 1), own_tracer=False)[0] is None
    assert judge(sched(0, 1, 1), sched(1, 1.9, 1.1), own_tracer=False)[0] is None
    # Spinning on a loaded host: it ran a quarter, waited the rest.
    assert judge(sched(0, 0, 0), sched(1, 0.25, 0.75), own_tracer=False)[0] is None


def test_judge_starved_is_held_with_the_figures() -> None:
    reason, words = judge(sched(0, 5, 5), sched(0.3, 5.01, 5.29), own_tracer=False)
    assert reason == "starved"
    assert words == "ran 0.01 s and waited 0.29 s for a CPU in the last 0.30 s"
    # Waiting most of the window is not enough: it ran little, too.
    ran = 1 / STARVED_RATIO + 0.01
    assert judge(sched(0, 0, 0), sched(1, ran, 0.6), own_tracer=False)[0] is None
    # Running little is not enough: it waited, too.
    assert judge(sched(0, 0, 0), sched(1, 0, 0.3), own_tracer=False)[0] is None


def test_judge_widens_a_short_window_that_shows_a_wait() -> None:
    """Waited, but ran more than a starved process: judged on a wider window
    (up to LONGEST_WINDOW); a short window that shows no wait is decided."""
    # The CI case: ran 0.02 s and waited 0.12 s in 0.10 s.
    assert judge(sched(0, 0, 0), sched(0.1, 0.02, 0.12), own_tracer=False)[0] == (
        "watch"
    )
    # The same pid over a wider window, a slice of 0.02 s in all: starved.
    assert judge(sched(0, 0, 0), sched(0.2, 0.02, 0.15), own_tracer=False)[0] == (
        "starved"
    )
    # Running as much at LONGEST_WINDOW: a spinner on a loaded host.
    at = LONGEST_WINDOW
    assert judge(sched(0, 0, 0), sched(at, at / 5, at), own_tracer=False)[0] is None
    # No wait in a short window: spinning or asleep, killed at once.
    assert judge(sched(0, 0, 0), sched(0.1, 0.09, 0.01), own_tracer=False)[0] is None
    assert judge(sched(0, 0, 0), sched(0.1, 0, 0), own_tracer=False)[0] is None


def test_judge_runnable_without_a_cpu_is_starved() -> None:
    # The kernel books a wait only once the thread gets a CPU: one that got
    # none in the window shows no wait, but it was runnable all along.
    first, second = sched(0, 2, 2, runnable=True), sched(1, 2, 2, runnable=True)
    assert judge(first, second, own_tracer=False)[0] == "starved"
    # Runnable at one reading only: it may have slept in between.
    asleep = sched(1, 2, 2, runnable=False)
    assert judge(first, asleep, own_tracer=False)[0] is None
    # Runnable and running: a busy loop.
    busy = sched(1, 2.5, 2, runnable=True)
    assert judge(first, busy, own_tracer=False)[0] is None


def test_judge_traced_unless_by_our_own_capture() -> None:
    first, stopped = sched(0, 1, 1), sched(1, 1, 1, tracer=999)
    assert judge(first, stopped, own_tracer=False)[0] == "traced"
    assert judge(first, stopped, own_tracer=True)[0] is None


# -- readings on a fake /proc ------------------------------------------------------


def test_read_sched_sums_threads_and_finds_a_ptrace_stop(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path)
    fake_stat(proc, 40, cpu_ticks=0)
    fake_task(proc, 40, 40, 2_000_000_000, 500_000_000)
    fake_task(proc, 40, 41, 1_000_000_000, 250_000_000, state="t", tracer=77)
    reading = read_sched(40, 5.0, str(proc))
    assert reading == Sched(5.0, 3.0, 0.75, 0.0, 7, 77, False)
    fake_task(proc, 40, 42, 0, 0, state="R")
    assert read_sched(40, 5.0, str(proc)).runnable  # type: ignore[union-attr]
    assert read_sched(41, 5.0, str(proc)) is None  # no such process
    assert procfs.cpu_pressure(str(proc)) == pytest.approx(64.2)


def test_checks_off_says_why(tmp_path: Path) -> None:
    assert checks_off(local=False) == (
        "circusd is not on this host (its pids are not ours to read)"
    )
    assert checks_off(local=True, proc=str(tmp_path / "none")) == (
        "this host has no /proc"
    )
    assert checks_off(local=True, proc=str(tmp_path)) == (
        "this kernel has no /proc/PID/schedstat (CONFIG_SCHED_INFO)"
    )
    assert checks_off(local=True, proc=str(fake_proc(tmp_path))) is None


def test_examiner_watch_then_hold_or_kill(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path)
    fake_stat(proc, 40, cpu_ticks=0)
    fake_task(proc, 40, 40, 0, 0)
    ex = Examiner(local=True, proc=str(proc))
    assert ex.on
    first = ex.examine(40, "web", None, 1.0)
    assert first.verdict == "watch" and first.reading is not None
    fake_task(proc, 40, 40, 10_000_000, 290_000_000)  # starved over 0.3 s
    found = ex.examine(40, "web", first.reading, 1.3)
    assert (found.verdict, found.reason) == ("hold", "starved")
    assert found.words == (
        "ran 0.01 s and waited 0.29 s for a CPU in the last 0.30 s; "
        "host CPU pressure 64 %"
    )
    fake_task(proc, 40, 40, 10_000_000, 290_000_000)  # then asleep: no change
    found = ex.examine(40, "web", ex.examine(40, "web", None, 2.0).reading, 2.15)
    assert (found.verdict, found.reason) == ("kill", None)
    assert found.words.startswith("ran 0.00 s and waited 0.00 s")
    # A pid reused between the readings starts over.
    fake_stat(proc, 40, cpu_ticks=0, start=8)
    assert ex.examine(40, "web", first.reading, 2.2).verdict == "watch"


def first_reading(tmp_path: Path) -> tuple[Path, Examiner, Sched | None]:
    """A fake pid 40 that has neither run nor waited, and its first reading
    (at 1.0)."""
    proc = fake_proc(tmp_path)
    fake_stat(proc, 40, cpu_ticks=0)
    fake_task(proc, 40, 40, 0, 0)
    ex = Examiner(local=True, proc=str(proc))
    return proc, ex, ex.examine(40, "web", None, 1.0).reading


def test_a_short_window_is_watched_until_it_is_long_enough(tmp_path: Path) -> None:
    _, ex, first = first_reading(tmp_path)
    found = ex.examine(40, "web", first, 1.0 + MIN_WINDOW / 2)
    assert found == ("watch", None, "", first)  # the first reading is kept
    assert ex.examine(40, "web", first, 1.0 + MIN_WINDOW).verdict == "kill"


def test_a_window_that_shows_a_wait_is_widened_then_decided(tmp_path: Path) -> None:
    proc, ex, first = first_reading(tmp_path)
    fake_task(proc, 40, 40, 20_000_000, 120_000_000)  # one slice in 0.1 s
    assert ex.examine(40, "web", first, 1.1) == ("watch", None, "", first)
    found = ex.examine(40, "web", first, 1.2)  # no more slices: starved
    assert (found.verdict, found.reason) == ("hold", "starved")
    fake_task(proc, 40, 40, 200_000_000, 300_000_000)  # ran 40 % of 0.5 s
    assert ex.examine(40, "web", first, 1.0 + LONGEST_WINDOW).verdict == "kill"


def test_examiner_traced_names_the_tracer(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path)
    fake_stat(proc, 40, cpu_ticks=0)
    fake_stat(proc, 999, cpu_ticks=0)  # its parent (field 4) is 0: not us
    (proc / "999" / "comm").write_text("gdb\n")
    fake_task(proc, 40, 40, 0, 0, state="t", tracer=999)
    ex = Examiner(local=True, proc=str(proc))
    first = ex.examine(40, "web", None, 1.0).reading
    found = ex.examine(40, "web", first, 1.15)
    assert (found.verdict, found.reason) == ("hold", "traced")
    assert found.words.startswith("traced by pid 999 (gdb); ran 0.00 s")


def test_examiner_unreadable_pid_is_killed_and_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Live processes (this one, its parent) missing from the tree: hidden.
    ex = Examiner(local=True, proc=str(fake_proc(tmp_path)))
    with caplog.at_level("WARNING", "circus.watchdog"):
        for pid in (os.getpid(), os.getppid()):
            found = ex.examine(pid, "web", None, 1.0)
            assert found.verdict == "kill" and "unreadable" in found.words
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        f"cannot read /proc/{os.getpid()} of web (hidepid, another pid "
        "namespace?): such pids are killed without the starved and traced checks"
    ]


def test_examiner_gone_pid_is_killed_without_a_word(
    tmp_path: Path, spawn: Children, caplog: pytest.LogCaptureFixture
) -> None:
    pid = spawn.start("true")
    spawn.procs[-1].wait(BOUND)  # reaped: gone
    ex = Examiner(local=True, proc=str(fake_proc(tmp_path)))
    with caplog.at_level("WARNING", "circus.watchdog"):
        found = ex.examine(pid, "web", None, 1.0)
    assert found == ("kill", None, "no evidence (it is gone)", None)
    assert caplog.records == []


# -- real processes ----------------------------------------------------------------


def two_readings(pid: int, window: float) -> tuple[str | None, str]:
    first = read_sched(pid, time.monotonic())
    time.sleep(window)
    second = read_sched(pid, time.monotonic())
    assert first is not None and second is not None
    own = bool(second.tracer) and procfs.parent_pid(second.tracer) == os.getpid()
    return judge(first, second, own_tracer=own)


@linux_only
def test_real_asleep_and_spinning_are_killed(spawn: Children) -> None:
    asleep = spawn.start("sleep", "60")
    spinning = spawn.start(sys.executable, "-c", "while True: pass")
    wait_for(lambda: state_of(asleep) == "S", timeout=BOUND)
    assert two_readings(asleep, 0.2)[0] is None  # no wait: decided at once
    # A spinner on a busy host may wait: judged on the widest window.
    assert two_readings(spinning, LONGEST_WINDOW)[0] is None


PTRACE_SEIZE, PTRACE_INTERRUPT = 0x4206, 0x4207

TRACER = """
import ctypes, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
pid = int(sys.argv[1])
assert libc.ptrace(0x4206, pid, None, None) == 0, ctypes.get_errno()
assert libc.ptrace(0x4207, pid, None, None) == 0, ctypes.get_errno()
print("stopped", flush=True)
time.sleep(60)
"""


@linux_only
def test_real_ptrace_stop_is_traced_and_our_own_tracer_is_not(spawn: Children) -> None:
    worker = spawn.start("sleep", "60")
    wait_for(lambda: state_of(worker) == "S", timeout=BOUND)
    tracer = subprocess.Popen(
        [sys.executable, "-c", TRACER, str(worker)], stdout=subprocess.PIPE
    )
    try:
        assert tracer.stdout is not None
        if tracer.stdout.readline() != b"stopped\n":
            pytest.skip("ptrace is not allowed here")
        wait_for(lambda: state_of(worker) == "t", timeout=BOUND)
        reading = read_sched(worker, time.monotonic())
        assert reading is not None and reading.tracer == tracer.pid
        # The tracer is our child here, as our diagnostic_command would be:
        # not someone's debugger.
        assert two_readings(worker, 0.05)[0] is None
        first = read_sched(worker, 0.0)
        second = read_sched(worker, 0.1)
        assert first is not None and second is not None
        assert judge(first, second, own_tracer=False)[0] == "traced"
    finally:
        tracer.kill()
        tracer.wait(BOUND)
        assert tracer.stdout is not None
        tracer.stdout.close()


HOG = "while True: pass"
STARVED = """
import os, time
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
try:
    with open("/proc/self/autogroup", "w") as f:
        f.write("19")
except OSError:
    pass
while True:
    pass
"""


@linux_only
def test_real_starved_worker_among_hogs_is_starved(spawn: Children) -> None:
    """One CPU hog per CPU at normal priority; a SCHED_IDLE worker (its
    autogroup at nice 19) is starved, a busy loop at normal priority is not."""
    cpus = len(os.sched_getaffinity(0))
    starved = spawn.start(sys.executable, "-c", STARVED)
    busy = spawn.start(sys.executable, "-c", HOG)
    for _ in range(cpus):
        spawn.start(sys.executable, "-c", HOG)
    time.sleep(0.3)  # every one of them is running
    reason, words = two_readings(starved, 0.3)
    assert reason == "starved", words
    reason, words = two_readings(busy, LONGEST_WINDOW)
    assert reason is None, words
