"""pids: what a pid may be; the vendorable client's copy of PID_MAX agrees."""

from __future__ import annotations

import pytest

from circus_watchdog import client, pids


def test_the_client_copy_of_pid_max_agrees() -> None:
    assert client.PID_MAX == pids.PID_MAX


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (1, True),
        (2**31 - 1, True),
        (0, False),
        (2**31, False),
        (True, False),
        ("1", False),
    ],
)
def test_is_pid(value: object, ok: bool) -> None:
    assert pids.is_pid(value) is ok
