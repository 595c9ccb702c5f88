"""Every hold said twice: once when it starts, once when it ends.

A hold (see `policy` for its reasons and bound) starts with the line
``holding WATCHER pid PID: REASON, DETAILS`` and ends with
``hold of WATCHER pid PID ended: resumed (REASON, held N s)`` when the pid
beats again, or with its kill line, which then says ``held N s (REASON)``.
A storm can start thousands of holds on one tick: at most ``HOLD_LINES``
lines are written per tick, and one more line counts the rest.
"""

from __future__ import annotations

import collections
import logging

from .registry import Late

logger = logging.getLogger("circus.watchdog")

HOLD_LINES = 20  # hold start and end lines per tick; the rest are summed up


class HoldLog:
    """Logs each hold once when it starts and once when it ends, at most
    ``HOLD_LINES`` lines a tick; ``flush`` sums up the rest."""

    def __init__(self) -> None:
        self._lines = 0
        self._unsaid: collections.Counter[str] = collections.Counter()

    def started(self, pid: int, late: Late, detail: str) -> None:
        """``pid``'s hold starts."""
        reason = late.reason or ""
        text = detail if detail.startswith(reason) else f"{reason}, {detail}"
        self._say(
            f"{reason} hold(s) started",
            "holding %s pid %d: %s",
            late.watcher,
            pid,
            text,
        )

    def ended(self, pid: int, late: Late, now: float) -> None:
        """``pid`` beat again: its hold ends."""
        self._say(
            f"{late.reason} hold(s) ended (resumed)",
            "hold of %s pid %d ended: resumed (%s, held %.1f s)",
            late.watcher,
            pid,
            late.reason,
            now - (late.held_since or now),
        )

    def _say(self, kind: str, fmt: str, *args: object) -> None:
        if self._lines < HOLD_LINES:
            self._lines += 1
            logger.warning(fmt, *args)
        else:
            self._unsaid[kind] += 1

    def flush(self) -> None:
        """End of a tick: one line for the lines left out."""
        if self._unsaid:
            logger.warning(
                "and %s",
                ", ".join(f"{n} more {kind}" for kind, n in self._unsaid.items()),
            )
        self._lines = 0
        self._unsaid.clear()
