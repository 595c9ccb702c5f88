"""Every read of ``/proc``: what the kernel says about a process.

The watchdog reads ``/proc`` to tell a live pid from a zombie (``alive``), to
walk a sender's parent chain for ``notify_access = all`` and to check that a
pid is circusd's child before inspecting it (``parent_pid``), to snapshot a
pid before a kill (``read_stat``, ``read_wchan``, ``count_fds``), to find
where circusd logs (``cwd``, ``cmdline``), to find the descriptors this
process inherited (``own_fds``), and to examine a late pid before a kill:
``read_sched`` (run time and run-queue wait summed over its threads, from
``/proc/PID/task/TID/schedstat``, whether a thread is runnable, and a thread
in a ptrace stop with its ``TracerPid``.  The kernel adds a thread's wait to
schedstat only when the thread gets a CPU, so a thread that waited through a
whole window without one shows no wait: it shows as runnable, ``R``),
``cpu_pressure``, and ``sched_info``: whether the kernel keeps schedstat at
all.

Each reader takes a ``proc`` root (a fake tree in tests) and returns None when
it cannot read: the pid is gone or was never there, belongs to another user
(``hidepid``), lives in another pid namespace, or the host has no ``/proc``
(macOS).  Those are ordinary answers for a watchdog whose pids come and go,
not errors: the callers fall back (trust ``kill(0)``, skip the snapshot
field, log to stderr) and a reader never raises.
"""

from __future__ import annotations

import os
from typing import NamedTuple

__all__ = [
    "PROC",
    "ProcStat",
    "Sched",
    "alive",
    "cmdline",
    "comm",
    "count_fds",
    "cpu_pressure",
    "cwd",
    "own_fds",
    "parent_pid",
    "read_sched",
    "read_stat",
    "read_wchan",
    "sched_info",
    "stat_fields",
]

PROC = "/proc"

try:
    CLK_TCK = os.sysconf("SC_CLK_TCK")
    PAGE = os.sysconf("SC_PAGE_SIZE")
except (AttributeError, ValueError, OSError):  # no sysconf: no /proc either
    CLK_TCK, PAGE = 100, 4096


def stat_fields(pid: int, proc: str = PROC) -> list[bytes] | None:
    """The fields of ``/proc/PID/stat`` after the command name (the state
    letter first, so field N of proc(5) is at index N - 3), or None."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as stat:
            data = stat.read()
    except (OSError, ValueError):  # ValueError: a pid with a NUL in it
        return None
    # proc(5): the command name may hold any byte, ")" and spaces included;
    # every later field is a number or the state, so it ends at the last ")".
    end = data.rfind(b")")
    return data[end + 2 :].split() if end > 0 else None


class ProcStat(NamedTuple):
    """The fields of ``/proc/PID/stat`` the kill snapshot uses."""

    state: str
    cpu: float  # utime + stime, seconds
    threads: int
    rss: int  # bytes
    start: int  # clock ticks after boot: tells a reused pid apart


def read_stat(pid: int, proc: str = PROC) -> ProcStat | None:
    """``pid``'s state, CPU time, threads, RSS and start time, or None."""
    fields = stat_fields(pid, proc)
    if fields is None:
        return None
    try:
        return ProcStat(
            fields[0].decode("ascii"),
            (int(fields[11]) + int(fields[12])) / CLK_TCK,  # fields 14, 15
            int(fields[17]),  # field 20
            int(fields[21]) * PAGE,  # field 24
            int(fields[19]),  # field 22
        )
    except (ValueError, IndexError, UnicodeDecodeError):
        return None


def parent_pid(pid: int, proc: str = PROC) -> int | None:
    """The parent of ``pid`` (0 for one with no parent here, as init), or None."""
    fields = stat_fields(pid, proc)
    if not fields or len(fields) < 2 or not fields[1].isdigit():
        return None
    return int(fields[1])


def alive(pid: int, proc: str = PROC) -> bool:
    """True while ``pid`` runs on this host; a zombie counts as gone."""
    try:
        os.kill(pid, 0)
    except PermissionError:
        pass  # it exists, owned by another user
    except ProcessLookupError:
        return False
    # A zombie is dead, only not yet reaped by its parent. No /proc (macOS),
    # or it vanished meanwhile: trust kill(0).
    fields = stat_fields(pid, proc)
    return not fields or fields[0] != b"Z"


def read_wchan(pid: int, proc: str = PROC) -> str | None:
    """The kernel function ``pid`` sleeps in, or None (running, hidden, gone)."""
    try:
        with open(f"{proc}/{pid}/wchan", "rb") as f:
            name = f.read(256).decode("ascii", "replace").strip()
    except (OSError, ValueError):
        return None
    return None if name in ("", "0") else name


def count_fds(pid: int, proc: str = PROC) -> int | None:
    """How many descriptors ``pid`` has open, or None."""
    fds = _fd_numbers(f"{proc}/{pid}/fd")
    return None if fds is None else len(fds)


def own_fds(proc: str = PROC) -> list[int] | None:
    """This process's open descriptors, sorted, from ``/proc/self/fd`` or,
    without ``/proc`` (macOS, the BSDs), ``/dev/fd``; or None."""
    found = _fd_numbers(f"{proc}/self/fd")
    return _fd_numbers("/dev/fd") if found is None else found


def _fd_numbers(path: str) -> list[int] | None:
    try:
        names = os.listdir(path)
    except (OSError, ValueError):
        return None
    return sorted(int(name) for name in names if name.isdigit())


def cwd(pid: int, proc: str = PROC) -> str | None:
    """``pid``'s working directory, or None."""
    try:
        return os.readlink(f"{proc}/{pid}/cwd")
    except (OSError, ValueError):
        return None


def cmdline(pid: int, proc: str = PROC) -> list[str] | None:
    """``pid``'s arguments (``[]`` for a kernel thread), or None."""
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except (OSError, ValueError):
        return None
    return [os.fsdecode(arg) for arg in raw.split(b"\0")[:-1]]


class Sched(NamedTuple):
    """What the scheduler recorded for a process (all its threads), at ``at``."""

    at: float  # monotonic time of the reading
    ran: float  # seconds on a CPU (schedstat field 1, summed)
    waited: float  # seconds runnable, waiting on a run queue (field 2)
    cpu: float  # utime + stime from /proc/PID/stat, seconds
    start: int  # the process's start time: tells a reused pid apart
    tracer: int  # TracerPid of a thread in a ptrace stop ('t'), else 0
    runnable: bool  # a thread is in state R (running or on a run queue)


def sched_info(proc: str = PROC) -> bool:
    """True if the kernel keeps ``/proc/PID/schedstat`` (CONFIG_SCHED_INFO)."""
    try:
        with open(f"{proc}/self/schedstat", "rb") as f:
            return len(f.read().split()) >= 2
    except (OSError, ValueError):
        return False


def read_sched(pid: int, at: float, proc: str = PROC) -> Sched | None:
    """``pid``'s run time and run-queue wait over its threads and its tracer
    (if a thread is in a ptrace stop), or None if any of it cannot be read."""
    stat = read_stat(pid, proc)
    try:
        tids = os.listdir(f"{proc}/{pid}/task")
    except (OSError, ValueError):
        return None
    if stat is None:
        return None
    ran = waited = 0
    tracer = 0
    runnable = False
    for tid in tids:
        task = f"{proc}/{pid}/task/{tid}"
        try:
            with open(f"{task}/schedstat", "rb") as f:
                times = f.read().split()
            run, wait = int(times[0]), int(times[1])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
        ran += run
        waited += wait
        fields = stat_fields(int(tid), f"{proc}/{pid}/task")
        state = fields[0] if fields else b""
        runnable = runnable or state == b"R"
        if state == b"t" and not tracer:
            tracer = _tracer(task)
    return Sched(at, ran / 1e9, waited / 1e9, stat.cpu, stat.start, tracer, runnable)


def _tracer(task: str) -> int:
    try:
        with open(f"{task}/status", "rb") as f:
            for line in f:
                if line.startswith(b"TracerPid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def comm(pid: int, proc: str = PROC) -> str | None:
    """``pid``'s command name (``/proc/PID/comm``), or None."""
    try:
        with open(f"{proc}/{pid}/comm", "rb") as f:
            return f.read(64).decode("utf-8", "replace").strip()
    except (OSError, ValueError):
        return None


def cpu_pressure(proc: str = PROC) -> float | None:
    """The share of the last 10 s some task waited for a CPU, in percent
    (``/proc/pressure/cpu``, ``some avg10``), or None."""
    try:
        with open(f"{proc}/pressure/cpu", "rb") as f:
            some = f.readline().split()
        return float(some[1].partition(b"=")[2])
    except (OSError, ValueError, IndexError):
        return None
