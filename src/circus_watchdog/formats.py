"""The ``msg_regex`` fallback for custom heartbeat formats.

The default ``PID;TIMESTAMP`` format never comes here: the core parses it in
the receive buffer.  A custom ``msg_regex`` (named group ``pid`` required,
``timestamp`` optional) is matched in Python against each decoded payload, as
the original plugin does, but a payload that does not decode or match is
counted as malformed instead of raising.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from ._core import DrainCounts, HeartbeatTable
from .pids import PID_MAX


def pid_of(text: str) -> int | None:
    """The pid a matched ``pid`` group names, if it can name a process."""
    if not (text.isascii() and text.isdigit()) or text[0] == "0" or len(text) > 10:
        return None
    pid = int(text)
    return pid if pid <= PID_MAX else None


def apply_regex(
    pattern: re.Pattern[str],
    table: HeartbeatTable,
    payloads: Iterable[bytes],
    now: float,
    max_age: float = 0.0,
    wall: float = 0.0,
) -> DrainCounts:
    """Match each payload and apply its heartbeat; counts like ``drain``.

    With ``max_age`` > 0 the pattern's ``timestamp`` group is checked as the
    core checks the default format's: not a number, or more than ``max_age``
    seconds away from ``wall``, is stale (counted, not applied).
    """
    datagrams = heartbeats = unknown = malformed = stale = 0
    for payload in payloads:
        datagrams += 1
        try:
            match = pattern.match(payload.decode())
        except UnicodeDecodeError:
            match = None
        pid = pid_of(match.group("pid") or "") if match else None
        if pid is None:
            malformed += 1
        elif max_age > 0 and not _fresh(match, max_age, wall):
            stale += 1
        elif table.beat(pid, now):
            heartbeats += 1
        else:
            unknown += 1
    return DrainCounts(datagrams, heartbeats, unknown, malformed, stale)


def _fresh(match: re.Match[str] | None, max_age: float, wall: float) -> bool:
    try:
        stamp = float(match.group("timestamp") or "") if match else math.nan
    except (IndexError, ValueError):  # no such group, or not a number
        return False
    return wall - max_age <= stamp <= wall + max_age
