"""circusd starting processes that beat from their first moment, on a real
circusd: their first heartbeats often come before their ``spawn`` events are
applied, and ask no full re-sync; every one is monitored through its event
(the mechanism: sync.py's module docstring)."""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable

from circus_watchdog.sync import UNKNOWN_QUIET
from support import Circusd, Standalone, free_udp_port, metric, wait_for, wait_pids

FLEET = 60  # processes circusd starts at once
BEAT = 0.5  # seconds between a process's heartbeats
# bash sends its first heartbeat a few milliseconds after its exec, before
# circusd has published the spawn event, and then one every BEAT seconds.
BEATER = (
    "exec 3>/dev/udp/127.0.0.1/{port}; "
    'while :; do printf "%s;%s" $$ "$EPOCHREALTIME" >&3; sleep {beat}; done'
)


def test_a_spawning_fleet_asks_no_resync(
    circusd_factory: Callable[..., Circusd],
    standalone: Callable[..., Standalone],
    core_tag: str,
) -> None:
    udp = free_udp_port()
    cmd = shlex.join(["/bin/bash", "-c", BEATER.format(port=udp, beat=BEAT)])
    circusd = circusd_factory(
        f"[watcher:web]\ncmd = {cmd}\nnumprocesses = 1\nwarmup_delay = 0\n"
    )
    first = wait_pids(circusd, {"web": 1})["web"]
    wd = standalone(
        circusd, "--loop-rate", "60", "--dry-run", "--port", str(udp), core=core_tag
    )
    wait_for(lambda: list(wd.monitored()) == first, 5)
    before = wd.metrics()

    circusd.call("incr", name="web", nb=FLEET, timeout=30)
    wait_for(lambda: len(circusd.pids("web")) == FLEET + 1, 30)
    want = set(circusd.pids("web"))
    wait_for(lambda: set(wd.monitored()) == want, 5)
    time.sleep(UNKNOWN_QUIET + 1.5)  # past the quiet and a tick: any ask is made
    after = wd.metrics()
    assert set(wd.monitored()) == want
    # Some first heartbeats came before their events (the case under test)...
    assert metric(after, "unknown_pid_total") > metric(before, "unknown_pid_total")
    # ...and none made circusd list every watcher again.
    assert metric(after, "resyncs_total") == metric(before, "resyncs_total")
