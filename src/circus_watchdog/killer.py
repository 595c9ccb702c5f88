"""Carries out the policy's kills: diagnose, kill through circusd, verify.

Before each kill, and each dry-run report, ``Diagnostics`` snapshots the
process, logs the kill line, runs ``diagnostic_command`` (bounded by
``diagnostic_timeout``) and writes the capture file; the kill is recorded in
``recent_kills`` with its outcome.  A local endpoint does not prove that
circusd's pids are ours (it may run in another pid namespace), so a pid is
inspected only if its parent here is circusd, whose pid ``dstats`` tells.

circusd's ``kill`` sends the stop signal and SIGKILLs the process if it
still runs ``graceful_timeout`` later; it answers at once unless asked to
wait (``waiting``), and answers "ok" for a pid it no longer knows.  So the
kill asks circusd to wait, and is then verified: through the local ``/proc``
where circusd runs on this host and in this pid namespace, else through
circusd's own ``list``, until the pid is gone or, counted from the kill,
the graceful timeout in use (``watchers_graceful_timeout``, else the
watcher's own, read with ``options``, at most ``MAX_GRACEFUL``) and
``KILL_CHECK_DELAY`` more have passed (a circusd that answers at once is
checked that long too).  A dry run only reports.  A kill task that fails
(a bug: every expected failure is handled inside it) is logged, never lost.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from typing import Any

from .circusd import CircusError
from .config import Config
from .diagnostics import Diagnostics, KillReport, Snapshot, Why
from .metrics import Metrics
from .procfs import alive, parent_pid
from .registry import Registry
from .sync import Caller
from .tasks import end
from .values import split_tcp

logger = logging.getLogger("circus.watchdog")

KILL_CHECK_DELAY = 1.0  # seconds a pid may linger after its SIGKILL
KILL_CHECK_INTERVAL = 0.1  # seconds between two checks that it is gone
CIRCUS_GRACEFUL_TIMEOUT = 30.0  # circus's default graceful_timeout, seconds
MAX_GRACEFUL = 300.0  # a longer graceful_timeout from circusd counts as this


def is_local_endpoint(endpoint: str) -> bool:
    """True if a circusd at ``endpoint`` runs on this host (ipc or loopback)."""
    scheme, _, address = endpoint.partition("://")
    if scheme == "ipc":
        return True
    host = split_tcp(address)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class KillFailed(Exception):
    """circusd did not kill the process."""


class Killer:
    """Kills silent pids through circusd, one task per kill."""

    def __init__(
        self,
        client: Caller,
        registry: Registry,
        metrics: Metrics,
        config: Config,
        diagnostics: Diagnostics,
        *,
        local: bool,
    ) -> None:
        self.client = client
        self.registry = registry
        self.metrics = metrics
        self.config = config
        self.local = local  # circusd's pids are ours to check in /proc
        self.diagnostics = diagnostics
        self._circusd_pid = 0  # as circusd's dstats last told it; 0: unknown
        self._tasks: set[asyncio.Task[None]] = set()

    def kill(self, pid: int, watcher: str, why: Why, *, dry_run: bool) -> None:
        """Kill late ``pid`` (the registry hands it over), or in a dry run
        report it (the caller re-arms it: it is reported again next timeout)."""
        if dry_run:
            self.metrics.would_kill += 1
        else:
            self.registry.start_kill(pid, watcher)
        task = asyncio.create_task(self._kill(pid, watcher, why, dry_run))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("a kill task failed", exc_info=task.exception())

    async def close(self) -> None:
        """Cancel the kills under way."""
        await end(list(self._tasks))

    async def _kill(self, pid: int, watcher: str, why: Why, dry_run: bool) -> None:
        report = await self._diagnose(pid, watcher, why, dry_run)
        if dry_run:
            self.diagnostics.record(pid, watcher, report, "dry_run")
            return
        try:
            if self.config.diagnostic_signal is not None:
                await self._signal(pid, watcher, self.config.diagnostic_signal)
            await self._call_kill(pid, watcher)
        except KillFailed as exc:
            self.metrics.kill_failures += 1
            logger.error("circusd did not kill %s pid %d: %s", watcher, pid, exc)
            self.diagnostics.record(pid, watcher, report, "failed")
        else:
            self.metrics.kills[watcher] += 1
            self.diagnostics.record(pid, watcher, report, "killed")
        finally:
            self.registry.end_kill(pid)

    async def _diagnose(
        self, pid: int, watcher: str, why: Why, dry_run: bool
    ) -> KillReport:
        try:
            ours = self.local and await self._child_of_circusd(pid, watcher)
            return await self.diagnostics.before_kill(
                pid, watcher, why, dry_run=dry_run, inspect=ours
            )
        except Exception:  # a bug there must never stop the kill
            logger.exception("diagnostics of %s pid %d failed", watcher, pid)
            return KillReport(time.time(), why.silent_for, Snapshot(pid), None)

    async def _child_of_circusd(self, pid: int, watcher: str) -> bool:
        parent = parent_pid(pid)
        if not parent:
            return False  # gone, or not visible here
        if parent != self._circusd_pid:  # unknown yet, or circusd restarted
            self._circusd_pid = await self._ask_circusd_pid()
        if parent == self._circusd_pid:
            return True
        logger.warning(
            "%s pid %d: its parent here (pid %d) is not circusd (pid %s): another "
            "pid namespace? No snapshot and no capture of it",
            watcher,
            pid,
            parent,
            self._circusd_pid or "unknown",
        )
        return False

    async def _ask_circusd_pid(self) -> int:
        try:
            reply = await self.client.call("dstats")
        except CircusError:
            return 0
        info = reply.get("info")
        pid = info.get("pid") if isinstance(info, dict) else None
        return pid if isinstance(pid, int) and pid > 0 else 0

    async def _call_kill(self, pid: int, watcher: str) -> None:
        graceful = await self._graceful_timeout(watcher)
        props: dict[str, Any] = {"name": watcher, "pid": pid, "waiting": True}
        if self.config.watchers_stop_signal is not None:
            props["signum"] = self.config.watchers_stop_signal
        if self.config.watchers_graceful_timeout is not None:
            props["graceful_timeout"] = graceful
        local = self.local and alive(pid)  # same host, same pid namespace
        start = time.monotonic()
        try:
            # The reply comes once the process is gone or SIGKILLed.
            await self.client.call(
                "kill", timeout=self.config.call_timeout + graceful, **props
            )
            deadline = max(time.monotonic(), start + graceful) + KILL_CHECK_DELAY
            for _ in range(
                int((graceful + KILL_CHECK_DELAY) / KILL_CHECK_INTERVAL) + 2
            ):
                if not await self._still_there(pid, watcher, local):
                    return
                if time.monotonic() >= deadline:
                    break
                await asyncio.sleep(KILL_CHECK_INTERVAL)
        except CircusError as exc:
            raise KillFailed(str(exc)) from None
        raise KillFailed(
            f"pid {pid} still runs after the kill (its graceful timeout "
            f"{graceful:g} s, and {KILL_CHECK_DELAY:g} s more)"
        )

    async def _graceful_timeout(self, watcher: str) -> float:
        """Seconds circusd waits after the stop signal before its SIGKILL."""
        graceful = self.config.watchers_graceful_timeout
        if graceful is not None:
            return graceful
        try:
            options = (await self.client.call("options", name=watcher)).get("options")
        except CircusError:
            return CIRCUS_GRACEFUL_TIMEOUT
        value = options.get("graceful_timeout") if isinstance(options, dict) else None
        if not isinstance(value, int | float) or isinstance(value, bool):
            return CIRCUS_GRACEFUL_TIMEOUT
        return min(max(float(value), 0.0), MAX_GRACEFUL)

    async def _still_there(self, pid: int, watcher: str, local: bool) -> bool:
        if local:
            return alive(pid)
        pids = (await self.client.call("list", name=watcher)).get("pids")
        return isinstance(pids, list) and pid in pids

    async def _signal(self, pid: int, watcher: str, signum: int) -> None:
        try:
            await self.client.call("signal", name=watcher, pid=pid, signum=signum)
        except CircusError as exc:
            logger.warning("could not signal %s pid %d: %s", watcher, pid, exc)
            return
        logger.warning(
            "sent signal %d to %s pid %d; killing it in %gs",
            signum,
            watcher,
            pid,
            self.config.diagnostic_delay,
        )
        await asyncio.sleep(self.config.diagnostic_delay)
