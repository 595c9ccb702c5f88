"""The msg_regex fallback, over both cores' tables."""

from __future__ import annotations

import re
from types import ModuleType

import pytest

from circus_watchdog.formats import apply_regex, pid_of

PATTERN = re.compile(r"^hb pid=(?P<pid>\S*) t=(?P<timestamp>\S+)$")


@pytest.mark.parametrize(
    ("text", "pid"),
    [
        ("1", 1),
        ("2147483647", 2**31 - 1),
        ("0", None),
        ("01", None),
        ("-1", None),
        ("+1", None),
        (" 1", None),
        ("", None),
        ("2147483648", None),
        ("١", None),
    ],
)
def test_pid_of(text: str, pid: int | None) -> None:
    assert pid_of(text) == pid


def test_apply_regex_counts(core: ModuleType) -> None:
    table = core.HeartbeatTable(3.0, 0.1)
    table.add(42, "w", 0.0)
    payloads = [
        b"hb pid=42 t=1",  # heartbeat
        b"hb pid=43 t=1",  # unknown pid
        b"42;1",  # default format: not this one
        b"hb pid=4x t=1",  # no pid
        b"hb pid= t=1",
        b"hb pid=42 t=\xff",  # not UTF-8
    ]
    counts = apply_regex(PATTERN, table, payloads, 5.0)
    assert counts == core.DrainCounts(6, 1, 1, 4)
    assert table.last_seen(42) == 5.0 and len(table) == 1


def test_optional_pid_group_that_did_not_match() -> None:
    from circus_watchdog.core import HeartbeatTable

    table = HeartbeatTable(3.0, 0.1)
    pattern = re.compile(r"^(?:(?P<pid>\d+)|x)$")
    assert apply_regex(pattern, table, [b"x"], 1.0).malformed == 1


def test_apply_regex_checks_max_age_on_the_timestamp_group(core: ModuleType) -> None:
    table = core.HeartbeatTable(3.0, 0.1)
    table.add(42, "w", 0.0)
    wall = 1_000_000.0
    payloads = [
        b"hb pid=42 t=1000000.5",  # fresh
        b"hb pid=42 t=999000",  # too old
        b"hb pid=42 t=1000100",  # too far ahead
        b"hb pid=42 t=soon",  # not a number
        b"hb pid=42 t=nan",
        b"hb pid=43 t=1000000",  # fresh but unknown
    ]
    counts = apply_regex(PATTERN, table, payloads, 5.0, 30.0, wall)
    assert counts == core.DrainCounts(6, 1, 1, 0, 4)
    assert table.last_seen(42) == 5.0
    # max_age off: every timestamp goes.
    assert apply_regex(PATTERN, table, payloads[:5], 6.0).heartbeats == 5
