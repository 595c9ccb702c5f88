"""circusd starting processes that beat from their first moment, on a real
circusd: their first heartbeats often come before their ``spawn`` events are
applied, and ask no full re-sync; every one is monitored through its event
(the mechanism: sync.py's module docstring)."""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable

from circus_watchdog.sync import UNKNOWN_DEFER, UNKNOWN_QUIET
from support import Circusd, Standalone, free_udp_port, metric, wait_for, wait_pids

FLEET = 30  # processes circusd starts in each of two bursts
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
    # Two bursts, the second after UNKNOWN_DEFER: each is bounded on its own.
    for total in (FLEET + 1, 2 * FLEET + 1):
        start = time.monotonic()
        before = wd.metrics()
        circusd.call("incr", name="web", nb=FLEET, timeout=30)
        want = wait_for(lambda n=total: _pids_if(circusd, n), 30)
        wait_for(lambda want=want: set(wd.monitored()) == want, 5)
        time.sleep(UNKNOWN_QUIET + 1.5)  # past the quiet and a tick: any ask made
        after = wd.metrics()
        assert set(wd.monitored()) == want, total
        # Some first heartbeats came before their events (the case under
        # test)...
        unknown = metric(after, "unknown_pid_total")
        assert unknown > metric(before, "unknown_pid_total"), total
        # ...and none made circusd list every watcher again.
        resyncs = metric(after, "resyncs_total")
        assert resyncs == metric(before, "resyncs_total"), total
        time.sleep(max(0.0, start + UNKNOWN_DEFER + 1 - time.monotonic()))


def _pids_if(circusd: Circusd, n: int) -> set[int] | None:
    """circusd's pids of web once it lists ``n``."""
    pids = set(circusd.pids("web"))
    return pids if len(pids) == n else None
