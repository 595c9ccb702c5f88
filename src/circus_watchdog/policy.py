"""Who dies and when: the guards between "this pid went silent" and a kill.

A pid whose timeout came is *late* (the registry keeps it, with its real last
heartbeat and its hold).  On each tick the policy splits the late pids that
expired into kills, holds and pids to examine:

- Self-stall (reason ``stall``): a tick that runs more than one tick late
  means the watchdog itself was frozen (blocked loop, paused VM, SIGSTOP), so
  the silence it sees may be its own.  Nothing is killed on that tick.  A pid
  already being examined (silent for a whole timeout before the freeze) is
  not held but watched one more evidence window (``watch``): its heartbeats,
  if the freeze kept them in the socket, are read by then.
- Kernel drops (``kernel_drops``): the kernel dropped heartbeats since the
  last tick (a full socket buffer): a silent pid may have beaten.
- Storm guard (``storm``): when more than ``max_kill_fraction`` of the
  monitored pids, and more than ``storm_floor`` pids, are silent now, the
  cause is more likely on the watchdog's side (a firewall rule, a broken
  client library) than in every process at once.  "Silent now" counts every
  late pid (expired on this tick, held, or being examined: until it beats
  again or is killed) and the kills made within the last timeout; while a
  storm lasts (a storm hold was made within two timeouts of the held pid) its
  kills do not age out of that count.  The share is of the fleet those
  kills came from: the most pids monitored since the oldest kill still
  counted (a killed pid leaves the table until circusd replaces it; counting it as
  silent but not as monitored would make two hung pids and one starved one
  in a fleet of seven a storm).  The storm line says ``N of M monitored pids
  are silent now or were killed within T s (S silent, K killed)``.
  The one rule for a storm's end: a pid held for ``storm`` stays held until
  it beats again or reaches the bound, whatever the others do (a stalled
  tick or kernel drops do not change its reason).  Its kill is never
  re-decided as the storm ebbs, so nothing is flushed when heartbeats
  resume: the pids killed over the whole storm are those killed before the
  guard tripped, at most the allowed share.  A pid that expires after the
  storm is decided afresh: once the storm's holds are over and its kills
  have aged out, a lone hang is killed on time; a real hang among the held
  ones is killed at the bound.  So silences that come together, spread over
  ticks or over a whole ``loop_rate``, end the same way.
- Evidence (``starved``, ``traced``): where circusd's pids can be read in
  ``/proc``, a late pid is examined before it is killed (how: `evidence`):
  the policy hands it to the engine as ``examine``, and `judge` decides on
  two readings one tick apart.  Traced: a thread is in a ptrace stop under a
  tracer that is not our own ``diagnostic_command``: an operator at work.
  Starved: over the window it ran at most ``1 / STARVED_RATIO`` of it, and
  it was waiting for a CPU: its run-queue wait grew by at least
  ``STARVED_WAIT`` of the window, or a thread was runnable (``R``) at both
  readings (the kernel books a wait only once the thread gets a CPU, so a
  thread that got none in the window shows no wait).  That is runnable but
  given almost no CPU: host overload, a cgroup quota, a low priority.  A
  hung process neither runs nor waits, and a spinning one runs: both are
  killed.  STARVED_RATIO is the margin between the two on a 2-CPU host with
  one CPU hog per CPU (docs/operations.md gives the figures measured there).
  A window shorter than ``LONGEST_WINDOW`` in which the pid waited but ran
  more than that is not judged yet: the pid is watched a tick more, the
  window growing from the same first reading (a starved thread gets a slice
  now and then, and one slice can fill a short window).
  A spinning process on a host so overloaded that it gets under
  ``1 / STARVED_RATIO`` of a CPU is held as starved, then killed at the
  bound.
- Dry run: the decision is made and reported, but the killer only logs it.

Every hold gives the pid a fresh deadline (its timeout) and is bounded: a pid
held for ``HOLD_LIMIT`` of its own timeouts since its hold began is killed at
its next expiry (not on a stalled tick), with the hold in the kill line.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from .procfs import Sched
from .registry import Late

logger = logging.getLogger("circus.watchdog")

#: A held pid is killed after this many of its timeouts of holding.
HOLD_LIMIT = 10

#: Every reason a kill can be held for (each has a kills_held series).
HOLD_REASONS = ("stall", "kernel_drops", "storm", "starved", "traced")

Expired = Sequence[tuple[int, Late]]

#: Starved: it ran at most 1 / STARVED_RATIO of the window ...
STARVED_RATIO = 8.0
#: ... and its run-queue wait grew by this share of it (or it stayed runnable).
STARVED_WAIT = 0.5
#: A shorter window that shows a wait and too much running is widened, seconds.
LONGEST_WINDOW = 0.5


@dataclass
class Decision:
    """What to do with the pids that expired on one tick."""

    kill: list[int] = field(default_factory=list)
    hold: list[tuple[int, str]] = field(default_factory=list)  # (pid, reason)
    examine: list[int] = field(default_factory=list)  # gather evidence first
    watch: list[int] = field(default_factory=list)  # one more evidence window
    stalled: bool = False  # nothing killed: the watchdog itself ran late
    dry_run: bool = False  # ``kill`` is only to be reported
    storm: str = ""  # the storm, in words, for the storm holds


def at_bound(late: Late, now: float) -> bool:
    """True once ``late``'s hold has lasted HOLD_LIMIT of its timeouts."""
    held = late.held_since
    return held is not None and now - held >= HOLD_LIMIT * late.timeout


def judge(first: Sched, second: Sched, *, own_tracer: bool) -> tuple[str | None, str]:
    """The hold reason (None: kill; "watch": widen the window first) for two
    readings of one process, and the window in words; ``own_tracer``: the
    tracer is our diagnostic_command."""
    window = max(second.at - first.at, 1e-9)
    ran = max(0.0, second.ran - first.ran)
    waited = max(0.0, second.waited - first.waited)
    words = (
        f"ran {ran:.2f} s and waited {waited:.2f} s for a CPU in the last "
        f"{window:.2f} s"
    )
    if second.tracer and not own_tracer:
        return "traced", words
    waiting = waited >= STARVED_WAIT * window or (first.runnable and second.runnable)
    if ran * STARVED_RATIO <= window and waiting:
        return "starved", words
    if waiting and window < LONGEST_WINDOW:
        return "watch", words
    return None, words


class KillPolicy:
    """Applies the stall, kernel-drop and storm guards to each tick's expiries."""

    def __init__(
        self,
        timeout: float,
        *,
        storm_guard: bool = True,
        max_kill_fraction: float = 0.5,
        storm_floor: int = 2,
        dry_run: bool = False,
        evidence: bool = False,
    ) -> None:
        self.timeout = timeout
        self.storm_guard = storm_guard
        self.max_kill_fraction = max_kill_fraction
        self.storm_floor = storm_floor
        self.dry_run = dry_run
        self.evidence = evidence  # late pids are examined before a kill
        self._recent: collections.deque[float] = collections.deque()  # kill times
        self._storm_until = -float("inf")  # kills do not age out before then
        self._fleet = 0  # the most pids monitored while the kills counted
        self._last_alarm = -float("inf")

    def decide(
        self,
        now: float,
        expired: Expired,
        *,
        monitored: int,
        silent: int,
        stalled: bool = False,
        dropped: int = 0,
    ) -> Decision:
        """Split ``expired`` into kills, holds and pids to examine.

        ``monitored`` counts the pids in the table and ``expired`` together;
        ``silent`` the late pids (``expired`` among them); ``stalled`` says
        the tick ran late; ``dropped`` counts datagrams the kernel dropped
        since the last tick.
        """
        if not expired:
            return Decision()
        if stalled or dropped:
            self._warn_own_silence(len(expired), stalled, dropped)
            own = "stall" if stalled else "kernel_drops"
            return Decision(
                hold=[
                    (p, late.reason if late.reason == "storm" else own)
                    for p, late in expired
                    if late.reading is None or not stalled
                ],
                watch=[p for p, late in expired if late.reading is not None]
                if stalled
                else [],
                stalled=stalled,
            )
        decision = Decision(dry_run=self.dry_run)
        storm = self._storm(now, silent, monitored) if self.storm_guard else ""
        decision.storm = storm or "held since the storm began"
        for pid, late in expired:
            if at_bound(late, now):
                decision.kill.append(pid)
            elif storm or late.reason == "storm":  # a storm hold lasts
                decision.hold.append((pid, "storm"))
                self._storm_until = max(self._storm_until, now + 2 * late.timeout)
            elif self.evidence:
                decision.examine.append(pid)
            else:
                decision.kill.append(pid)
        self.killed(now, len(decision.kill))
        return decision

    def killed(self, now: float, count: int) -> None:
        """Count ``count`` kills made at ``now`` toward the storm guard
        (``decide`` counts its own; the engine, those made on evidence).  A
        dry run's are not counted: the pid stays monitored, and counts as
        silent for as long as it is."""
        if not self.dry_run:
            self._recent.extend([now] * count)

    def _storm(self, now: float, silent: int, monitored: int) -> str:
        if now >= self._storm_until:  # no storm on: old kills age out
            window = now - self.timeout
            while self._recent and self._recent[0] < window:
                self._recent.popleft()
        killed = len(self._recent)
        # The fleet the counted kills came from: they left the table.
        self._fleet = max(self._fleet, monitored) if killed else monitored
        would_die = silent + killed
        storm = (
            would_die > self.storm_floor
            and would_die > self.max_kill_fraction * self._fleet
        )
        if not storm:
            return ""
        during = " or during this storm" if now < self._storm_until else ""
        words = (
            f"{would_die} of {self._fleet} monitored pids are silent now or were "
            f"killed within {self.timeout:g} s{during}"
        )
        if killed:
            words += f" ({silent} silent, {killed} killed)"
        if now - self._last_alarm >= self.timeout:
            self._last_alarm = now
            logger.error(
                "STORM GUARD: %s; holding their kills (each for at most %d of "
                "its timeouts). Check the heartbeat path (port, firewall, client "
                "library); storm_guard = false disables this guard",
                words,
                HOLD_LIMIT,
            )
        return words

    @staticmethod
    def _warn_own_silence(count: int, stalled: bool, dropped: int) -> None:
        if stalled:
            logger.warning(
                "watchdog tick ran late (stalled): not killing %d silent pid(s), "
                "giving them a fresh timeout",
                count,
            )
        else:
            logger.warning(
                "the kernel dropped %d datagram(s) since the last tick (raise "
                "rcvbuf and net.core.rmem_max): not killing %d silent pid(s) now",
                dropped,
                count,
            )
