"""A real circusd running the fleet, and the daemons that watch it.

The ``fleet`` watcher (or ``fleet0``, ``fleet1``, ...) runs ``procs``
processes (``cmd``: ``bench/floors/beat.c`` beating to one fixed port, or
``pause.c`` for loadgen to beat for): the heartbeats carry their real pids.
The ``probe`` watcher runs one more (``probe_cmd``) that never beats by
itself, for the freshness measurement.
Each daemon is the standalone ``circus-watchdog`` on its own UDP port (or the
fixed one), monitoring every watcher, with ``--loop-rate 3600`` (no pid times
out during a run) and ``--dry-run`` (nothing is ever killed).
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

from harness import (
    Circusd,
    Standalone,
    circusd_pool,
    free_udp_port,
    standalone_pool,
    wait_for,
)

SLEEP = "sleep 36000"  # a real process that costs nothing
SPAWN_LIMIT = 120.0  # seconds for circusd to start the fleet, plus 1 s per 25
SPAWN_POLL = 1.0  # seconds between counts of circusd's children (a /proc scan)
CHECK_DELAY = 5  # circusd's check_delay: circus's default, as fleets run it
SYNC_LIMIT = 60.0  # seconds for a daemon to monitor the whole fleet
WATCHED = r"^(fleet\d*|probe)$"


@dataclass
class Daemon:
    """A running daemon and the UDP port it reads."""

    name: str
    proc: Standalone
    port: int
    flags: tuple[str, ...]


@dataclass
class Fleet:
    circusd: Circusd
    pids: list[int]  # the fleet's, flooded
    probe: int  # the probe's pid, never flooded
    start_daemon: Callable[..., Standalone]
    cpu: int | None

    def daemon(self, name: str, *flags: str, port: int = 0) -> Daemon:
        """Start ``circus-watchdog`` with ``flags`` on UDP ``port`` (0: a free
        one); return once it monitors every fleet and probe pid, its threads
        pinned to the receivers' CPU."""
        port = port or free_udp_port()
        args = ("--port", str(port), "--loop-rate", "3600", "--dry-run")
        args += ("--watchers-regex", WATCHED, *flags)
        proc = self.start_daemon(self.circusd, *args, core=None)
        want = {*self.pids, self.probe}
        wait_for(lambda: set(proc.monitored()) == want, SYNC_LIMIT, interval=0.2)
        if self.cpu is not None:
            pin_threads(proc.proc.pid, self.cpu)
        return Daemon(name, proc, port, tuple(flags))


def children(pid: int, name: str | None = None) -> int:
    """How many children ``pid`` has (running the executable ``name``).
    Read from /proc/PID/task/*/children: psutil's ``children()`` reads the
    stat of every process on the host, a fifth of a core once a second with
    20,000 of them."""
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            kids += task.read_text().split()
    if name is None:
        return len(kids)
    n = 0
    for kid in kids:
        with contextlib.suppress(OSError):
            n += Path(f"/proc/{kid}/comm").read_text().rstrip("\n") == name
    return n


def fleet_port(tries: int = 100) -> int:
    """A UDP port on 127.0.0.1, free a moment ago, below the kernel's
    ephemeral range: each fleet process's socket takes an ephemeral port at
    its first send, and 20,000 of them hold most of that range, so a port
    picked there (binding port 0) was often taken by the time a receiver
    bound it."""
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
    low = int(ephemeral.split()[0])
    for port in random.sample(range(low // 2, low), tries):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free UDP port below {low} in {tries} tries")


def pin_threads(pid: int, cpu: int) -> None:
    """Pin every thread of ``pid`` (threads started later inherit it)."""
    for thread in psutil.Process(pid).threads():
        os.sched_setaffinity(thread.id, {cpu})


@contextmanager
def fleet(
    workdir: Path,
    procs: int,
    cpu: int | None,
    cmd: str = SLEEP,
    probe_cmd: str | None = None,
    watchers: int = 1,
) -> Iterator[Fleet]:
    """circusd with the fleet (each process runs ``cmd``; ``watchers`` > 1:
    split over watchers fleet0, fleet1, ...) and the probe (``probe_cmd``,
    default ``cmd``); everything stopped on exit."""
    names = ["fleet"] if watchers == 1 else [f"fleet{i}" for i in range(watchers)]
    sections = "".join(
        f"[watcher:{name}]\ncmd = {cmd}\nwarmup_delay = 0\n"
        f"numprocesses = {procs // watchers + (i < procs % watchers)}\n\n"
        for i, name in enumerate(names)
    )
    sections += f"[watcher:probe]\ncmd = {probe_cmd or cmd}\nnumprocesses = 1\n"
    with (
        circusd_pool(workdir) as start_circusd,
        standalone_pool(workdir, show_logs=False) as start_daemon,
    ):
        circusd = start_circusd(sections, check_delay=CHECK_DELAY)
        # Counted from /proc, not by asking circusd: its `list name=W` reads
        # every process's status, and polling it slowed a 20,000-process
        # spawn to a crawl.
        circusd.wait_for(
            lambda: children(circusd.proc.pid) >= procs + 1,
            SPAWN_LIMIT + procs / 25,
            interval=SPAWN_POLL,
        )
        pids = [pid for name in names for pid in circusd.pids(name)]
        [probe] = circusd.pids("probe")
        assert len(pids) == procs, f"circusd lists {len(pids)} of {procs} pids"
        yield Fleet(circusd, pids, probe, start_daemon, cpu)
