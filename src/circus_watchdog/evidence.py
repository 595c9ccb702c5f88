"""Evidence about a late pid before it is killed: starved, traced, or neither.

Evidence is gathered only for pids that are late, never for healthy ones: a
pid that beats on time costs no ``/proc`` read at all.  When a pid's timeout
comes (and the checks are on), the engine takes a first reading
(``procfs.read_sched``: run time and run-queue wait summed over its threads,
and the tracer of a thread in a ptrace stop) and puts the pid back in the
table for one tick, so a heartbeat still counts (it then resumes, nothing
more is read).  At the next tick, still silent, a second reading is taken and
`policy.judge` decides on the difference over that window (the *evidence
window*: one tick, and at least ``MIN_WINDOW``: with a shorter tick the pid
is watched a few ticks more; one that waited for a CPU but ran more than a
starved process does is watched until the window reaches
``policy.LONGEST_WINDOW``).  So a hung or spinning pid is killed at its
timeout plus one tick (the wheel) plus the evidence window, and the kill
line's ``ran ... and waited ... in the last W s`` covers that window; the
snapshot's CPU figure is the process's total since it started.

Why ``MIN_WINDOW``: the scheduler hands a starved thread a slice now and
then (a few ms), so over a very short window one slice can look like a fair
share.  Measured on this project's 2-CPU test host, loaded (CPU pressure
80-90 %), one CPU hog per CPU, 10 windows each: a SCHED_IDLE worker ran at
most 14.8 % of a 0.05 s window but at most 1.3 % of a 0.1 s one and 0.8 % of a
0.3 s one, while a busy loop at normal priority ran at least 18 % (0.1 s) and
22 % (0.3 s).  The 0.1 s window is still short: in a CI run (pure-Python
core, 2-CPU VM, 2026-12-05) the starved worker of
``tests/test_decisions_circusd.py`` ran 0.02 s of a 0.10 s window, waiting
0.12 s, and was killed; hence ``LONGEST_WINDOW``.


At most ``READINGS_PER_TICK`` readings are taken on one tick, second
readings first: a storm of silent pids beyond that (with the storm guard off,
or within the allowed share of a huge fleet) is deferred, not dropped: the
engine re-arms the rest so that about half a tick's readings come due on each
following tick.  After the tick on which they expire (which costs the table's
expiry of each), a tick's work is bounded, and the last of N deferred pids is
decided about ``2 * N / READINGS_PER_TICK`` ticks late.

The checks are off, and a late pid is killed as before, where there is no
evidence: circusd on another host (its pids are not ours), a kernel without
``/proc/PID/schedstat`` (``CONFIG_SCHED_INFO``), or no ``/proc``; the engine
says so once at start (`Examiner.off`).  A pid whose ``/proc`` entry cannot
be read (``hidepid``, another pid namespace) is killed without them, said
once.
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

from .policy import judge
from .procfs import (
    PROC,
    Sched,
    alive,
    comm,
    cpu_pressure,
    parent_pid,
    read_sched,
    sched_info,
)

logger = logging.getLogger("circus.watchdog")

#: Evidence readings taken on one tick at most (each reads a few small
#: /proc files per thread of the pid).
READINGS_PER_TICK = 100
#: The shortest evidence window, seconds (see module doc) ...
MIN_WINDOW = 0.1
#: ... give or take this much, so that a tick of exactly MIN_WINDOW is enough.
WINDOW_SLACK = 0.001


class Finding(NamedTuple):
    """What one reading of a late pid leads to."""

    verdict: str  # "watch" (first reading: look again next tick), "hold", "kill"
    reason: str | None = None  # of a hold: starved, traced
    words: str = ""  # for the hold line or the kill line
    reading: Sched | None = None  # to keep, with "watch"


def checks_off(*, local: bool, proc: str = PROC) -> str | None:
    """Why the starved and traced checks are off here, or None if they are on."""
    if not local:
        return "circusd is not on this host (its pids are not ours to read)"
    if not os.path.isdir(proc):
        return "this host has no /proc"
    if not sched_info(proc):
        return "this kernel has no /proc/PID/schedstat (CONFIG_SCHED_INFO)"
    return None


class Examiner:
    """Takes the readings of late pids and judges them (see module doc)."""

    def __init__(self, *, local: bool, proc: str = PROC) -> None:
        self.proc = proc
        self.off = checks_off(local=local, proc=proc)
        self._said_unreadable = False

    @property
    def on(self) -> bool:
        """True if late pids are examined before a kill."""
        return self.off is None

    def examine(
        self, pid: int, watcher: str, first: Sched | None, now: float
    ) -> Finding:
        """Read ``pid`` at ``now`` and say what follows, given its ``first``
        reading (None: this is the first)."""
        second = read_sched(pid, now, self.proc)
        if second is None:
            if not alive(pid, self.proc):  # gone: circusd will report it
                return Finding("kill", words="no evidence (it is gone)")
            self._unreadable(pid, watcher)
            return Finding("kill", words="no evidence (its /proc is unreadable)")
        if first is None or first.start != second.start:
            return Finding("watch", reading=second)
        if second.at - first.at < MIN_WINDOW - WINDOW_SLACK:
            return Finding("watch", reading=first)  # look again next tick
        tracer = second.tracer
        own = bool(tracer) and parent_pid(tracer, self.proc) == os.getpid()
        reason, words = judge(first, second, own_tracer=own)
        if reason == "watch":
            return Finding("watch", reading=first)  # a wider window next tick
        if reason == "traced":
            name = comm(tracer, self.proc) or "?"
            return Finding("hold", reason, f"traced by pid {tracer} ({name}); {words}")
        if reason == "starved":
            pressure = cpu_pressure(self.proc)
            if pressure is not None:
                words += f"; host CPU pressure {pressure:.0f} %"
            return Finding("hold", reason, words)
        return Finding("kill", words=words)

    def _unreadable(self, pid: int, watcher: str) -> None:
        if not self._said_unreadable:
            self._said_unreadable = True
            logger.warning(
                "cannot read /proc/%d of %s (hidepid, another pid namespace?): "
                "such pids are killed without the starved and traced checks",
                pid,
                watcher,
            )
