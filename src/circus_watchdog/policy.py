"""Who dies and when: the guards between "this pid went silent" and a kill.

- Self-stall: a tick that runs more than one tick late means the watchdog
  itself was frozen (blocked loop, paused VM, SIGSTOP), so the silence it sees
  may be its own.  Nothing is killed on that tick; the silent pids get a fresh
  deadline.
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
  cannot tell the first ones from a real hang.
"""

from __future__ import annotations

import collections
import logging
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


class KillPolicy:
    """Applies the self-stall and storm guards to each tick's silent pids."""

    def __init__(
        self,
        timeout: float,
        *,
        storm_guard: bool = True,
        max_kill_fraction: float = 0.5,
        storm_floor: int = 2,
    ) -> None:
        self.timeout = timeout
        self.storm_guard = storm_guard
        self.max_kill_fraction = max_kill_fraction
        self.storm_floor = storm_floor
        self.hold_limit = HOLD_LIMIT * timeout  # seconds a kill may be held
        self._recent: collections.deque[float] = collections.deque()  # kill times
        # pid -> (first held, last held) of the current hold of each pid
        self._held: dict[int, tuple[float, float]] = {}
        self._last_alarm = -float("inf")

    def decide(
        self, now: float, silent: Silent, monitored: int, *, stalled: bool = False
    ) -> Decision:
        """Split ``silent`` (already out of the table) into kills and re-arms.

        ``monitored`` counts the pids still in the table.
        """
        if not silent:
            return Decision()
        if stalled:
            logger.warning(
                "watchdog tick ran late (stalled): not killing %d silent pid(s), "
                "giving them a fresh timeout",
                len(silent),
            )
            return Decision(rearm=list(silent))
        window = now - self.timeout
        while self._recent and self._recent[0] < window:
            self._recent.popleft()
        limit = self.hold_limit
        # A pid still silent comes back every timeout (plus a tick): one not
        # seen for two timeouts resumed, and a later hold starts afresh.
        resumed = now - 2 * self.timeout
        for pid in [p for p, (_, last) in self._held.items() if last < resumed]:
            del self._held[pid]
        decision = Decision(kill=list(silent))
        would_die = len(self._recent) + len(silent)
        if (
            self.storm_guard
            and would_die > self.storm_floor
            and would_die > self.max_kill_fraction * (monitored + len(silent))
        ):
            decision.kill = []
            for pid, watcher in silent:
                since = self._held.get(pid, (now, now))[0]
                if now - since >= limit:
                    decision.kill.append((pid, watcher))
                else:
                    self._held[pid] = (since, now)
                    decision.rearm.append((pid, watcher))
            decision.held = len(decision.rearm)
            if decision.held and now - self._last_alarm >= self.timeout:
                self._last_alarm = now
                logger.error(
                    "STORM GUARD: %d of %d monitored pids went silent within %gs; "
                    "holding their kills (each for at most %gs). Check the "
                    "heartbeat path (port, firewall, client library); "
                    "storm_guard = false disables this guard",
                    would_die,
                    monitored + len(silent),
                    self.timeout,
                    limit,
                )
        for pid, _ in decision.kill:
            self._held.pop(pid, None)
            self._recent.append(now)
        return decision
