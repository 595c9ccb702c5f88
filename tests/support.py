"""What tests import, from this one module: the test-only helpers below and,
re-exported, what tests share with the benchmarks (tests/harness.py: circusd
start-up, free ports, the standalone command, /status and /metrics readers).

Take the ``circusd_factory`` fixture (tests/conftest.py), which stops every
circusd it started, and everything they started, when the test ends::

    def test_app(circusd_factory):
        circusd = circusd_factory(f"[watcher:app]\\ncmd = {SLEEPER}\\nnumprocesses = 2")
        circusd.wait_for(lambda: len(circusd.pids("app")) == 2, timeout=5)

Async tests run a coroutine on each event loop with ``run(loop_factory, coro)``
and the ``loop_factory`` fixture.

Watchdog tests run heartbeating processes with ``worker_cmd(udp_port, ...)``
(circus_watchdog.demo_worker: healthy, hanging after a while, silent, or in a
custom format), read the watchdog's ``fetch_status``/``fetch_metrics`` on its
metrics port, and time kills with ``check_kill_latency``.
"""

from __future__ import annotations

import asyncio
import shlex
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import psutil

from harness import (
    CONFLICT,
    SLEEPER,
    STANDALONE_EXIT_BOUND,
    STANDALONE_START_BOUND,
    START_TIMEOUT,
    STOP_TIMEOUT,
    Circusd,
    Standalone,
    circusd_pool,
    command,
    fetch_metrics,
    fetch_status,
    free_port,
    free_ports,
    free_udp_port,
    http_get,
    kills,
    metric,
    parse_metrics,
    scaled,
    standalone_pool,
    start_circusd,
    wait_for,
)

__all__ = [
    "CONFLICT",
    "NO_EXTENSIONS",
    "SLEEPER",
    "STANDALONE_EXIT_BOUND",
    "STANDALONE_START_BOUND",
    "START_TIMEOUT",
    "STOP_TIMEOUT",
    "Circusd",
    "Standalone",
    "check_kill_latency",
    "circusd_pool",
    "command",
    "fetch_metrics",
    "fetch_status",
    "free_port",
    "free_ports",
    "free_udp_port",
    "hang_times",
    "http_get",
    "kills",
    "metric",
    "parse_metrics",
    "process_gone",
    "run",
    "scaled",
    "standalone_pool",
    "start_circusd",
    "use_core",
    "wait_for",
    "wait_gone",
    "wait_pids",
    "worker_cmd",
]

T = TypeVar("T")


def run(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
    main: Awaitable[T],
    timeout: float = 30.0,
) -> T:
    """Run ``main`` on a fresh loop from ``loop_factory``, bounded by
    ``scaled(timeout)``."""
    loop = loop_factory()
    try:
        return loop.run_until_complete(asyncio.wait_for(main, scaled(timeout)))
    finally:
        try:
            loop.run_until_complete(_cancel_leftovers())
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()


async def _cancel_leftovers() -> None:
    # Tasks a failed test left running, so closing the loop doesn't warn.
    tasks = asyncio.all_tasks() - {asyncio.current_task()}
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# -- heartbeating workers ------------------------------------------------------

#: Forces the pure-Python core in a subprocess (circusd passes it to the plugin).
NO_EXTENSIONS = "CIRCUS_WATCHDOG_NO_EXTENSIONS"


def use_core(monkeypatch: Any, is_pure_python: bool) -> None:
    """Make subprocesses started from now on (circusd, its plugin, the CLI) pick
    one core, through the environment they inherit."""
    if is_pure_python:
        monkeypatch.setenv(NO_EXTENSIONS, "1")
    else:
        monkeypatch.delenv(NO_EXTENSIONS, raising=False)


def worker_cmd(
    port: int,
    *,
    interval: float = 0.1,
    hang_after: float | None = None,
    hang_file: Path | None = None,
    template: str | None = None,
    silent: bool = False,
) -> str:
    """A watcher ``cmd`` running circus_watchdog.demo_worker against ``port``."""
    args = [sys.executable, "-m", "circus_watchdog.demo_worker"]
    args += ["--address", f"127.0.0.1:{port}", "--interval", str(interval)]
    if hang_after is not None:
        args += ["--hang-after", str(hang_after)]
    if hang_file is not None:
        args += ["--hang-file", str(hang_file)]
    if template is not None:
        args += ["--format", template]
    if silent:
        args.append("--silent")
    return shlex.join(args)


def hang_times(path: Path) -> dict[int, float]:
    """pid -> time.time() of its last heartbeat, for each worker that hung."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    found: dict[int, float] = {}
    for line in text.splitlines():
        pid, _, last = line.partition(" ")
        if pid and last:
            found[int(pid)] = float(last)
    return found


def wait_gone(circusd: Circusd, watcher: str, pid: int, timeout: float) -> float:
    """Wait until circusd no longer lists ``pid``; the time.time() it was seen gone."""
    circusd.wait_for(lambda: pid not in circusd.pids(watcher), timeout, interval=0.02)
    return time.time()


def process_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie nobody reaps counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_pids(
    circusd: Circusd, counts: dict[str, int], timeout: float = 10.0
) -> dict[str, list[int]]:
    """Wait until each watcher runs its number of processes; their pids."""

    def all_up() -> dict[str, list[int]] | None:
        pids = {name: circusd.pids(name) for name in counts}
        ok = all(len(pids[name]) == n for name, n in counts.items())
        return pids if ok else None

    return circusd.wait_for(all_up, timeout)


def check_kill_latency(
    circusd: Circusd,
    watcher: str,
    pid: int,
    hangs: Path,
    *,
    timeout: float,
    tick: float,
    since: float = 0.0,
    slack: float = 0.4,
) -> float:
    """Wait for hung ``pid`` (a worker with ``--hang-file hangs``) to leave
    circusd's list, and check when against the contract: never before
    ``timeout`` after its last heartbeat, at most one ``tick`` after that (or
    after ``since``, a time.time() by which the watchdog monitored it, should
    it have hung before the watchdog knew it), with ``slack`` for the kill
    round trip, circusd's bookkeeping and this polling (keep it under
    loop_rate: the original plugin kills up to one loop_rate late; `scaled`
    stretches it on a slow machine).

    Returns the time from the last heartbeat to the pid's disappearance."""
    gone_at = wait_gone(circusd, watcher, pid, timeout=10 + timeout)
    last_beat = wait_for(lambda: hang_times(hangs).get(pid), timeout=1)
    assert gone_at - last_beat >= timeout - 0.05, gone_at - last_beat
    assert gone_at - max(last_beat, since) <= timeout + tick + scaled(slack), (
        gone_at - last_beat,
        gone_at - since,
    )
    return gone_at - last_beat
