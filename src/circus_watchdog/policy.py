"""Who dies and when: the guards between "this pid went silent" and a kill.

- Self-stall: a tick that runs more than one tick late means the watchdog
  itself was frozen (blocked loop, paused VM, SIGSTOP), so the silence it sees
  may be its own.  Nothing is killed on that tick; the silent pids get a fresh
  deadline.
- Kernel drops: when the kernel dropped heartbeats since the last tick (a full
  socket buffer), a silent pid may have beaten; the same: a fresh deadline.
- Storm guard: when more than ``max_kill_fraction`` of the monitored pids, and
  more than ``storm_floor`` pids, would die within one timeout window, the
  cause is more likely on the watchdog's side (a firewall rule, a broken
  client library, a full socket) than in every process at once.  Those kills
  are held: the pids get a fresh deadline, so a pid that resumes is never
  killed and one that stays silent comes back at its next deadline.  A hold is
  bounded: a pid silent for ``HOLD_LIMIT`` timeouts in a row since its first
  hold is killed anyway.  The guard counts the kills already made in the
  window too, so silences spread over several ticks still trip it, but only
  once the window holds more than the allowed share: it caps casualties, it
  cannot tell the first ones from a real hang.  Each pid is held against its
  own timeout (``watcher_timeouts``), so a watcher with a long one is bounded too.
- Dry run: the decision is made and reported, but the killer only logs it.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

logger = logging.getLogger("circus.watchdog")

#: A held pid is killed after this many timeouts of holding (see module doc).
HOLD_LIMIT = 10

Silent = list[tuple[int, str]]


@dataclass
class Decision:
    """What to do with the pids that went silent on one tick."""

    kill: Silent = field(default_factory=list)
    rearm: Silent = field(default_factory=list)  # fresh deadline, no kill
    held: int = 0  # of rearm, how many the storm guard held
    stalled: bool = False  # nothing killed: the watchdog itself ran late
    dry_run: bool = False  # ``kill`` is only to be reported


class KillPolicy:
    """Applies the self-stall and storm guards to each tick's silent pids."""

    def __init__(
        self,
        timeout: float,
        *,
        storm_guard: bool = True,
        max_kill_fraction: float = 0.5,
        storm_floor: int = 2,
        dry_run: bool = False,
        timeout_of: Callable[[str], float] | None = None,
    ) -> None:
        self.timeout = timeout
        self.storm_guard = storm_guard
        self.max_kill_fraction = max_kill_fraction
        self.storm_floor = storm_floor
        self.dry_run = dry_run
        self.timeout_of = timeout_of or (lambda _watcher: timeout)
        self._recent: collections.deque[float] = collections.deque()  # kill times
        # pid -> (first held, last held, its timeout) of each pid's current hold
        self._held: dict[int, tuple[float, float, float]] = {}
        self._last_alarm = -float("inf")

    def decide(
        self,
        now: float,
        silent: Silent,
        monitored: int,
        *,
        stalled: bool = False,
        dropped: int = 0,
    ) -> Decision:
        """Split ``silent`` (already out of the table) into kills and re-arms.

        ``monitored`` counts the pids still in the table; ``stalled`` says the
        tick ran late; ``dropped`` counts datagrams the kernel dropped since
        the last tick.
        """
        if not silent:
            return Decision()
        if stalled:
            logger.warning(
                "watchdog tick ran late (stalled): not killing %d silent pid(s), "
                "giving them a fresh timeout",
                len(silent),
            )
            return Decision(rearm=list(silent), stalled=True)
        if dropped:
            logger.warning(
                "the kernel dropped %d datagram(s) since the last tick (raise "
                "rcvbuf and net.core.rmem_max): not killing %d silent pid(s) now",
                dropped,
                len(silent),
            )
            return Decision(rearm=list(silent))
        window = now - self.timeout
        while self._recent and self._recent[0] < window:
            self._recent.popleft()
        # A pid still silent comes back every timeout (plus a tick): one not
        # seen for two of its timeouts resumed, and a later hold starts afresh.
        for pid in [p for p, (_, last, t) in self._held.items() if last < now - 2 * t]:
            del self._held[pid]
        decision = Decision(kill=list(silent), dry_run=self.dry_run)
        would_die = len(self._recent) + len(silent)
        if (
            self.storm_guard
            and would_die > self.storm_floor
            and would_die > self.max_kill_fraction * (monitored + len(silent))
        ):
            self._hold(now, silent, decision)
            if decision.held and now - self._last_alarm >= self.timeout:
                self._last_alarm = now
                logger.error(
                    "STORM GUARD: %d of %d monitored pids went silent within %gs; "
                    "holding their kills (each for at most %d of its timeouts). "
                    "Check the heartbeat path (port, firewall, client library); "
                    "storm_guard = false disables this guard",
                    would_die,
                    monitored + len(silent),
                    self.timeout,
                    HOLD_LIMIT,
                )
        for pid, _ in decision.kill:
            self._held.pop(pid, None)
            self._recent.append(now)
        return decision

    def _hold(self, now: float, silent: Silent, decision: Decision) -> None:
        # Hold each pid, unless it has been held for HOLD_LIMIT of its timeouts.
        decision.kill = []
        for pid, watcher in silent:
            timeout = self.timeout_of(watcher)
            since = self._held.get(pid, (now, now, timeout))[0]
            if now - since >= HOLD_LIMIT * timeout:
                decision.kill.append((pid, watcher))
            else:
                self._held[pid] = (since, now, timeout)
                decision.rearm.append((pid, watcher))
        decision.held = len(decision.rearm)
