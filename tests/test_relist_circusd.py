"""The watched set follows circusd through watcher operations,
on a real circusd: reloadconfig adds a watcher whose command fails, then fixes
it with an ``[env:...]`` section (circusd re-creates the watcher), then removes
it; after each step the daemon monitors exactly what circusd lists within a
second (the mechanism: sync.py's module docstring)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import psutil

from support import (
    SLEEPER,
    Circusd,
    Standalone,
    free_udp_port,
    wait_for,
    wait_pids,
)

ROUNDS = 3
WITHIN = 1.0  # seconds for the monitored set to match circusd's
SETTLE_LIMIT = 15.0  # seconds for circusd to run the fixed watcher
FLAKY = """
[watcher:flaky]
cmd = /bin/sh -c 'test -n "$FIXED" && exec {sleeper}'
numprocesses = 1
"""
FIX = """
[env:flaky]
FIXED = 1
"""


def pids_of(circusd: Circusd, watcher: str) -> list[int]:
    """circusd's pids of ``watcher``; none while circusd does not know it
    (reloadconfig registers a re-created watcher only once it has started)."""
    try:
        return circusd.pids(watcher)
    except AssertionError as exc:
        assert "not found" in str(exc)
        return []


def listed(circusd: Circusd) -> set[int]:
    """The live pids circusd lists for web and flaky."""
    pids = pids_of(circusd, "web") + pids_of(circusd, "flaky")
    return {pid for pid in pids if psutil.pid_exists(pid)}


def matches_within(circusd: Circusd, wd: Standalone, what: str) -> None:
    """The daemon monitors what circusd lists, within WITHIN seconds."""
    want = listed(circusd)
    start = time.monotonic()
    wait_for(lambda: set(wd.monitored()) == want, WITHIN, interval=0.02)
    took = time.monotonic() - start
    assert listed(circusd) == want, f"{what}: circusd's list moved meanwhile"
    assert took <= WITHIN, (what, took)


def test_reloadconfig_add_fix_remove_keeps_the_watched_set_in_step(
    circusd_factory: Callable[..., Circusd],
    standalone: Callable[..., Standalone],
    core_tag: str,
) -> None:
    circusd = circusd_factory(f"[watcher:web]\ncmd = {SLEEPER}\nnumprocesses = 1\n")
    base = circusd.ini.read_text()
    wait_pids(circusd, {"web": 1})
    wd = standalone(
        circusd,
        "--loop-rate",
        "60",
        "--dry-run",
        "--port",
        str(free_udp_port()),
        core=core_tag,
    )
    flaky = FLAKY.format(sleeper=SLEEPER)
    for rnd in range(ROUNDS):
        circusd.ini.write_text(base + flaky)  # a failing command: it flaps
        circusd.call("reloadconfig", timeout=10)
        time.sleep(0.3)
        circusd.ini.write_text(base + flaky + FIX)  # fixed: re-created
        circusd.call("reloadconfig", timeout=10)

        def running() -> bool:  # the fixed command, past its shell's exec
            pids = pids_of(circusd, "flaky")
            try:
                return len(pids) == 1 and psutil.Process(pids[0]).cmdline()[:1] == [
                    sys.executable
                ]
            except psutil.NoSuchProcess:
                return False

        circusd.wait_for(running, SETTLE_LIMIT, interval=0.05)
        matches_within(circusd, wd, f"round {rnd}: fixed")
        circusd.ini.write_text(base)  # removed: none of its pids stays
        circusd.call("reloadconfig", timeout=10)
        circusd.wait_for(lambda: "flaky" not in circusd.call("list")["watchers"], 10)
        matches_within(circusd, wd, f"round {rnd}: removed")
