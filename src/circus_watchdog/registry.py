"""Which pids are watched: the one owner of every pid's lifecycle.

circusd is the only source of pids (never a heartbeat). A pid circusd reports
is in exactly one of these states, and only this module moves it:

- monitored: in the table, which owns its timing (last heartbeat, deadline);
- late: its timeout came (``expire`` takes it out of the table) and the
  policy has not killed it: being decided on, watched for evidence one more
  tick, or held.  A late pid is put back in the table with a fresh deadline
  (``rearm``), so its heartbeats still count, and keeps here the time of its
  real last heartbeat and its hold; a heartbeat since the re-arm makes it
  monitored again (``resumed``);
- excluded: its watcher is never watched: the one running this watchdog, and
  circus's own (``circusd-stats``, every ``plugin:*``) unless ``include_circus``;
- being killed: the policy chose it and the killer is at work (out of the table);
- killed but still listed: circusd sends no ``reap`` for what it kills, and a
  ``list`` taken in between still shows it: it must not be re-learnt (and
  killed twice) before circusd forgets it.

A re-sync reads the pid set with ``list`` while events keep arriving; events
seen during that read (the churn) know better than the listing and win.
Everything here is plain data and methods: the clock is passed in, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ._core import HeartbeatTable
from .pids import is_pid

#: circus's own watchers: its statistics daemon and every plugin.
CIRCUS_STATS = "circusd-stats"
PLUGIN_PREFIX = "plugin:"


class Settings(Protocol):
    """The options the registry reads (a Config has them)."""

    @property
    def watchers_regex(self) -> re.Pattern[str]: ...
    @property
    def include_circus(self) -> bool: ...
    @property
    def grace(self) -> float | None: ...
    def timeout_of(self, watcher: str) -> float: ...


@dataclass(slots=True)
class Late:
    """A pid whose timeout came and that is not being killed."""

    watcher: str
    timeout: float  # its watcher's timeout, as the table has it
    since: float  # its last heartbeat (first estimate: the deadline - timeout)
    rearmed: float  # put back in the table then: a later last_seen is a beat
    held_since: float | None = None  # its current hold began then
    reason: str | None = None  # of its current hold
    reading: Any = None  # the first evidence reading (procfs.Reading)


def is_circus_own(watcher: str) -> bool:
    """True for circusd-stats and plugin watchers, which send no heartbeats."""
    return watcher == CIRCUS_STATS or watcher.startswith(PLUGIN_PREFIX)


class Registry:
    """The monitored pids, learnt from circusd's listings and events."""

    def __init__(
        self, table: HeartbeatTable, settings: Settings, *, self_pids: Iterable[int]
    ) -> None:
        self.table = table
        self._settings = settings
        self._self_pids = frozenset(self_pids)
        self._watchers: set[str] = set()  # monitored watchers, as last listed
        self._excluded: dict[str, int] = {}  # excluded watcher -> its pid count
        self._self_watchers: set[str] = set()  # runs this watchdog
        self._killing: dict[int, str] = {}
        self._killed: dict[int, str] = {}
        self._late: dict[int, Late] = {}
        self._churn: dict[int, str] | None = None  # events during a listing

    # -- what is watched -----------------------------------------------------

    def matches(self, watcher: str) -> bool:
        """True if ``watchers_regex`` matches ``watcher`` (it may be excluded)."""
        return self._settings.watchers_regex.match(watcher) is not None

    def wants(self, watcher: str) -> bool:
        """True if ``watcher``'s processes are monitored."""
        return (
            self.matches(watcher)
            and watcher not in self._self_watchers
            and (self._settings.include_circus or not is_circus_own(watcher))
        )

    @property
    def watchers(self) -> tuple[str, ...]:
        """The monitored watchers, sorted (each has a kills series from the start)."""
        return tuple(sorted(self._watchers))

    @property
    def excluded(self) -> dict[str, int]:
        """Watchers matched by watchers_regex but never watched, with pid counts."""
        return dict(self._excluded)

    @property
    def killing(self) -> list[int]:
        """Pids the killer is at work on."""
        return sorted(self._killing)

    # -- circusd's view ------------------------------------------------------

    def begin_listing(self) -> None:
        """A ``list`` is about to be read: note the events that arrive meanwhile."""
        self._churn = {}

    def abort_listing(self) -> None:
        """The ``list`` failed: forget the churn."""
        self._churn = None

    def apply_listing(
        self, listing: Mapping[str, Iterable[object]], now: float, *, fresh: bool
    ) -> int:
        """Make the monitored set circusd's: ``listing`` maps every watcher
        name that ``matches`` to its pids.  ``fresh`` restarts every timeout
        (after a reconnection).  Returns how many pids it learnt."""
        churn, self._churn = self._churn or {}, None
        found = self._sort_listing(listing)
        for watcher in self._watchers:
            self._learn_timeout(watcher)
        if fresh:
            self._late.clear()  # every timeout restarts: nobody is late
        return self._admit(found, churn, now, fresh=fresh, only=None)

    def apply_watcher(
        self, watcher: str, pids: Iterable[object] | None, now: float
    ) -> int:
        """The same for one watcher: ``pids`` as ``list`` gave them, None if
        circusd does not know the watcher (now).  Returns how many pids it
        learnt."""
        churn, self._churn = self._churn or {}, None
        valid = [p for p in pids or () if is_pid(p)]
        if self._self_pids.intersection(valid):
            self._self_watchers.add(watcher)
        self._excluded.pop(watcher, None)
        self._watchers.discard(watcher)
        found: dict[int, str] = {}
        if pids is not None and self.wants(watcher):
            self._watchers.add(watcher)
            self._learn_timeout(watcher)
            found = dict.fromkeys(valid, watcher)
        elif pids is not None and self.matches(watcher):
            self._excluded[watcher] = len(valid)
        return self._admit(found, churn, now, fresh=False, only=watcher)

    def _admit(
        self,
        found: dict[int, str],
        churn: dict[int, str],
        now: float,
        *,
        fresh: bool,
        only: str | None,
    ) -> int:
        # The table follows ``found`` (of watcher ``only``, or of every one).
        def mine(watcher: str) -> bool:
            return only is None or watcher == only

        for pid in self.table.pids():
            if (
                pid not in found
                and pid not in churn
                and mine(self.table.watcher_of(pid))
            ):
                self.table.remove(pid)
                self._late.pop(pid, None)
        for pid in [p for p, w in self._killed.items() if p not in found and mine(w)]:
            del self._killed[pid]  # gone from circusd's list: nothing to guard
        learnt = 0
        for pid, watcher in found.items():
            if (
                pid in churn
                or pid in self._killing
                or pid in self._killed
                or pid in self._late
            ):
                # An event since `list`, or a kill, knows better; a late pid
                # is out of the table while it is examined, and adding it
                # back would pass for a heartbeat and restart its silence.
                continue
            if fresh or pid not in self.table or self.table.watcher_of(pid) != watcher:
                learnt += pid not in self.table
                self.table.add(pid, watcher, now)
        return learnt

    def _sort_listing(self, listing: Mapping[str, Iterable[object]]) -> dict[int, str]:
        # The monitored pids of a listing; notes our own watcher, the monitored
        # watchers and the excluded ones on the way.
        found: dict[int, str] = {}
        self._excluded.clear()
        for name, pids in listing.items():
            valid = [p for p in pids if is_pid(p)]
            if self._self_pids.intersection(valid):
                self._self_watchers.add(name)
            if self.wants(name):
                found.update((p, name) for p in valid)
            elif self.matches(name):
                self._excluded[name] = len(valid)
        self._watchers = {name for name in listing if self.wants(name)}
        return found

    def apply_event(self, watcher: str, action: str, pid: object, now: float) -> None:
        """Apply one ``spawn``, ``reap`` or ``kill`` event of a process."""
        if not is_pid(pid) or not self.wants(watcher):
            return
        if pid in self._self_pids:
            self._self_watchers.add(watcher)
            self.table.remove(pid)
            return
        self._late.pop(pid, None)
        if action == "spawn":
            self._killing.pop(pid, None)  # a reused pid: a new process
            self._killed.pop(pid, None)
            self._watchers.add(watcher)
            self._learn_timeout(watcher)
            self.table.add(pid, watcher, now, self._settings.grace)
        elif action in ("reap", "kill"):
            # circusd is stopping it (or has): nothing left to watch.
            self.table.remove(pid)
        else:
            return
        if self._churn is not None:
            self._churn[pid] = action

    def _learn_timeout(self, watcher: str) -> None:
        timeout = self._settings.timeout_of(watcher)
        if self.table.watcher_timeout(watcher) != timeout:
            self.table.set_watcher_timeout(watcher, timeout)

    # -- the kill path -------------------------------------------------------

    def expire(self, now: float) -> list[tuple[int, Late]]:
        """Take the pids whose timeout came at ``now`` out of the table; they
        are late until ``rearm``, ``start_kill`` or a heartbeat."""
        out = []
        for pid, watcher in self.table.expire(now):
            late = self._late.get(pid)
            if late is None:
                timeout = self.table.watcher_timeout(watcher)
                late = self._late[pid] = Late(watcher, timeout, now - timeout, now)
            out.append((pid, late))
        return out

    def resumed(self) -> list[tuple[int, Late]]:
        """The late pids that beat since their re-arm: monitored again."""
        table = self.table
        back = [
            (pid, late)
            for pid, late in self._late.items()
            if pid in table and table.last_seen(pid) > late.rearmed
        ]
        for pid, _ in back:
            del self._late[pid]
        return back

    def late(self, pid: int) -> Late | None:
        """``pid``'s record while it is late, else None."""
        return self._late.get(pid)

    @property
    def late_count(self) -> int:
        """How many pids are late (silent past their timeout) now."""
        return len(self._late)

    def held(self) -> list[tuple[int, Late]]:
        """The pids held now."""
        return [(p, late) for p, late in self._late.items() if late.reason]

    def last_heartbeat(self, pid: int) -> float:
        """When ``pid`` last beat (a re-arm is no heartbeat); KeyError if it
        is not monitored."""
        seen = self.table.last_seen(pid)
        late = self._late.get(pid)
        return late.since if late is not None and seen <= late.rearmed else seen

    def rearm(
        self, pid: int, now: float, window: float | None = None, reading: Any = None
    ) -> None:
        """Put late ``pid`` back in the table: deadline ``window`` away, else
        its timeout; ``reading`` is kept as its first evidence reading."""
        late = self._late.get(pid)
        if late is None:
            return
        self.table.add(pid, late.watcher, now, window)
        late.rearmed = now
        late.reading = reading

    def hold(self, pid: int, reason: str, now: float) -> bool:
        """Mark late ``pid`` held for ``reason``; True if its hold starts now."""
        late = self._late[pid]
        late.reason = reason
        if late.held_since is None:
            late.held_since = now
            return True
        return False

    def start_kill(self, pid: int, watcher: str) -> None:
        """The killer takes ``pid``: out of the table, no longer late."""
        self._late.pop(pid, None)
        self.table.remove(pid)
        self._killing[pid] = watcher

    def end_kill(self, pid: int) -> None:
        """The kill is over; circusd may list the pid a little longer."""
        watcher = self._killing.pop(pid, None)
        if watcher is not None:
            self._killed[pid] = watcher
