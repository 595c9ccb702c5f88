"""The CPU a pid used since its last heartbeat: baselines taken off the hot path.

The kill line says how much CPU a silent pid used since its last heartbeat
(a hung process used none, a busy loop used all it got).  That needs the
pid's CPU time at about its last heartbeat, read without touching the
receive path: ``CpuSampler`` visits a bounded slice of the monitored pids
once per tick, in round robin, each pid about every ``loop_rate / 2``
seconds (``MAX_VISITS`` per tick at most, so a huge fleet stretches the
visits, not the tick).  For a pid whose ``last_seen`` changed since its
previous visit it records the pid's CPU time (``procfs.read_stat``); at kill
time the CPU used since that visit is the CPU used since (at most one visit
after) the last heartbeat.  Its state is one entry per monitored pid,
dropped when the pid leaves the table.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol

from .procfs import PROC, read_stat

__all__ = ["MAX_VISITS", "UNREADABLE", "Baseline", "CpuSampler", "Table"]

# Pids the sampler visits per tick at most (about 3 to 12 ms when each needs a
# /proc read), so a huge fleet stretches the visits, not the tick.
MAX_VISITS = 1000
UNREADABLE = -1  # Baseline.start of a pid whose /proc entry could not be read


class Baseline(NamedTuple):
    """A pid's CPU time at the first sampler visit after a heartbeat."""

    beat: float  # the table's last_seen when the visit saw it (monotonic)
    cpu: float  # CPU seconds used by the pid then
    start: int  # the pid's start time (a reused pid has another); or UNREADABLE
    at: float  # when the visit took place (monotonic)


class Table(Protocol):
    """The two heartbeat-table methods the sampler reads."""

    def pids(self) -> list[int]: ...

    def last_seen(self, pid: int) -> float: ...


class CpuSampler:
    """Per-pid CPU baselines, refreshed a bounded slice at a time."""

    def __init__(self, period: float, tick: float, proc: str = PROC) -> None:
        # Visit each pid every ``period`` (loop_rate / 2: a pid beating every
        # loop_rate costs one /proc read per beat, and the baseline is at most
        # period late); the MAX_VISITS cap stretches that for huge fleets.
        self._rounds_per_tick = tick / period
        self.proc = proc
        self._order: list[int] = []
        self._next = 0
        # Baselines of the pids visited in this round, and of the last round's
        # pids not visited yet: what is left there at the end of a round left
        # the table, and goes without a scan of the whole fleet.
        # Plain tuples of numbers: the garbage collector untracks those, so a
        # big fleet's baselines do not lengthen its full collections.
        self._base: dict[int, tuple[float, float, int, float]] = {}
        self._last_round: dict[int, tuple[float, float, int, float]] = {}

    def __len__(self) -> int:
        return len(self._base) + len(self._last_round)

    def visits(self, monitored: int) -> int:
        """Pids visited per tick for a fleet of ``monitored`` pids."""
        want = math.ceil(monitored * self._rounds_per_tick)
        return min(monitored, MAX_VISITS, max(1, want))

    def sample(self, table: Table, now: float) -> None:
        """Visit the next slice of ``table``'s pids (call once per tick)."""
        if self._next >= len(self._order):  # a new round
            self._order = table.pids()
            self._next = 0
            self._last_round, self._base = self._base, {}
        end = min(len(self._order), self._next + self.visits(len(self._order)))
        for pid in self._order[self._next : end]:
            self._visit(table, pid, now)
        self._next = end

    def _visit(self, table: Table, pid: int, now: float) -> None:
        old = self._last_round.pop(pid, None) or self._base.get(pid)
        try:
            beat = table.last_seen(pid)
        except KeyError:  # left the table since the round began
            self._base.pop(pid, None)
            return
        if old is not None and old[0] == beat:
            self._base[pid] = old  # no heartbeat since the last visit: keep it
            return
        stat = read_stat(pid, self.proc)
        if stat is None:  # remembered, so it is read again only after a beat
            self._base[pid] = (beat, 0.0, UNREADABLE, now)
        else:
            self._base[pid] = (beat, stat.cpu, stat.start, now)

    def baseline(self, pid: int) -> Baseline | None:
        """The latest baseline of ``pid``, if any."""
        found = self._base.get(pid) or self._last_round.get(pid)
        return None if found is None else Baseline._make(found)

    def forget(self, pid: int) -> None:
        """Drop ``pid``'s baseline (it was killed)."""
        self._base.pop(pid, None)
        self._last_round.pop(pid, None)
