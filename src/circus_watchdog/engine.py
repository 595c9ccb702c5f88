"""The watchdog: wires the parts together and runs the tick loop.

Data flows one way::

    sockets -> receiver -> table (core)            heartbeats
    tick -> registry.expire -> policy -> (evidence) -> killer -> circusd
    circusd list/events -> sync -> registry -> table

Each part owns its state: the table the timing of every monitored pid, the
registry every pid's lifecycle (late and held pids included), sync whether
circusd is connected, the policy its storm window, the killer its kills under
way, ``Metrics`` the counters.  The engine carries out each tick's decision
(holds are logged by `holds.HoldLog`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import time
from typing import Any

from . import __version__
from ._core import HeartbeatTable, compiled
from .circusd import CommandClient, EventSubscriber
from .config import Config
from .diagnostics import Diagnostics, Why
from .evidence import READINGS_PER_TICK, Examiner
from .holds import HoldLog
from .killer import Killer, is_local_endpoint
from .metrics import Metrics, Readings, make_registry, serve_http
from .policy import KillPolicy
from .receiver import Receiver
from .registry import Registry
from .sync import Sync
from .tasks import end

logger = logging.getLogger("circus.watchdog")

SUMMARY_INTERVAL = 10.0  # seconds between summaries of ignored datagrams


def version_info(loop_name: str) -> dict[str, str]:
    """Version, core and event loop, as /metrics' info labels."""
    return {
        "version": __version__,
        "core": "c" if compiled else "py",
        "loop": loop_name,
    }


def describe(info: dict[str, str]) -> str:
    """The version line (``--version``, the start-up log, /status)."""
    return f"circus-watchdog {info['version']} core={info['core']} loop={info['loop']}"


class Watchdog:
    """Tracks heartbeats of circusd's processes and kills the silent ones."""

    def __init__(
        self,
        config: Config,
        *,
        loop_name: str = "asyncio",
    ) -> None:
        self.config = config
        self.table = HeartbeatTable(config.timeout, config.tick)
        self.metrics = Metrics()
        self.registry = Registry(self.table, config, self_pids={os.getpid()})
        local = is_local_endpoint(config.endpoint)
        self.examiner = Examiner(local=local)
        self.policy = KillPolicy(
            config.timeout,
            storm_guard=config.storm_guard,
            max_kill_fraction=config.max_kill_fraction,
            storm_floor=config.storm_floor,
            dry_run=config.dry_run,
            evidence=self.examiner.on,
        )
        self.receiver = Receiver(
            config,
            self.table,
            self.metrics,
            on_unknown=lambda: self.sync.unknown_seen(),
        )
        self.client = CommandClient(
            config.endpoint,
            timeout=config.call_timeout,
            on_connect=lambda: self.sync.on_connect(),
            on_disconnect=lambda: self.sync.on_disconnect(),
        )
        self.sync = Sync(
            self.client,
            self.registry,
            self.metrics,
            endpoint=config.endpoint,
            resync_interval=config.resync_interval,
        )
        self.diagnostics = Diagnostics(config, self.metrics, local=local)
        self.killer = Killer(
            self.client,
            self.registry,
            self.metrics,
            config,
            self.diagnostics,
            local=local,
        )
        self.info = version_info(loop_name)
        self.holds = HoldLog()
        self._drops_at_tick = 0  # the table's kernel drop count at the last tick

    @property
    def address(self) -> tuple[str, int] | None:
        """The UDP heartbeat socket's (ip, port), once running."""
        return self.receiver.address

    def describe(self) -> str:
        """The version line: version, core and event loop."""
        return describe(self.info)

    async def run(self, stop: asyncio.Event) -> None:
        """Watch until ``stop`` is set; OSError (naming the option) if a socket
        or port cannot be had."""
        self.receiver.open()
        events = EventSubscriber(self.config.pubsub_endpoint)
        server: asyncio.Server | None = None
        tasks: list[asyncio.Task[None]] = []
        started = False
        try:
            server = await self._serve_metrics()
            await events.start()
            await self.client.start()
            self.receiver.start(asyncio.get_running_loop())
            tasks = [
                asyncio.create_task(self._tick_loop(), name="tick"),
                asyncio.create_task(self.sync.run_events(events), name="events"),
                asyncio.create_task(self.sync.run_resyncs(), name="resync"),
            ]
            self._log_start()
            started = True
            stopper = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait(
                [stopper, *tasks], return_when=asyncio.FIRST_COMPLETED
            )
            stopper.cancel()
            for task in done:
                if task is not stopper:
                    task.result()  # a crashed task: raise it
        finally:
            await end(tasks)
            await self.killer.close()
            if server is not None:
                server.close()
                await server.wait_closed()
            await events.close()
            await self.client.close()
            self.receiver.close()
            logger.info("watchdog stopped" if started else "watchdog did not start")

    async def _serve_metrics(self) -> asyncio.Server | None:
        config = self.config
        if not config.metrics_port:
            return None
        registry = make_registry(self.metrics, self.readings, self.info)
        server = await serve_http(
            config.metrics_host, config.metrics_port, registry, self.status
        )
        if not ipaddress.ip_address(config.metrics_host).is_loopback:
            logger.warning(
                "metrics_host %s is not loopback: /metrics and /status (pids, "
                "watcher names) are open to the network",
                config.metrics_host,
            )
        return server

    def _log_start(self) -> None:
        config = self.config
        logger.info(
            "%s listening on %s, circusd %s, timeout %gs, tick %gs%s",
            self.describe(),
            self.receiver.listening(),
            config.endpoint,
            config.timeout,
            config.tick,
            " (dry run: nothing will be killed)" if config.dry_run else "",
        )
        if self.examiner.off is not None:
            logger.warning(
                "starved and traced checks off: %s; a silent pid is killed at "
                "its timeout whatever it was doing",
                self.examiner.off,
            )
        if not compiled:
            logger.warning(
                "running the pure-Python core (several times slower per heartbeat): %s",
                "CIRCUS_WATCHDOG_NO_EXTENSIONS is set"
                if os.environ.get("CIRCUS_WATCHDOG_NO_EXTENSIONS")
                else "the compiled core is not built (reinstall with a C compiler)",
            )

    # -- ticks ---------------------------------------------------------------

    async def _tick_loop(self) -> None:
        tick = self.config.tick
        due = time.monotonic() + tick
        summary = _Summary(self.metrics, due + SUMMARY_INTERVAL)
        while True:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            now = time.monotonic()
            late = now - due > tick  # late by more than one tick: we froze
            due = max(due + tick, now)
            self.tick(now, late=late)
            summary.maybe_log(now)

    def tick(self, now: float, *, late: bool = False) -> None:
        """Expire the silent pids and act on the policy's decision."""
        self.receiver.collect()
        drops = self.table.kernel_drops - self._drops_at_tick
        self._drops_at_tick += drops
        if not self.sync.connected:
            return  # never kill on stale state: wait for a fresh list
        registry = self.registry
        for pid, back in registry.resumed():
            if back.reason is not None:
                self.holds.ended(pid, back, now)
        expired = registry.expire(now)
        if expired:
            decision = self.policy.decide(
                now,
                expired,
                monitored=len(self.table) + len(expired),
                silent=registry.late_count,
                stalled=late,
                dropped=drops,
            )
            self.metrics.stalls += decision.stalled
            for pid, reason in decision.hold:
                self.hold(pid, reason, now, decision.storm or _own(reason, drops))
            for pid in decision.kill:
                self.kill(pid, now, dry_run=decision.dry_run)
            for pid in decision.watch:  # keeps its first reading
                first = registry.late(pid)
                reading = None if first is None else first.reading
                registry.rearm(pid, now, self.table.tick / 2, reading)
            self.examine(decision.examine, now, dry_run=decision.dry_run)
        self.holds.flush()

    def examine(self, pids: list[int], now: float, *, dry_run: bool) -> None:
        """Read each late pid and watch it one more tick, hold it, or kill it.

        At most READINGS_PER_TICK readings, second readings first; the rest
        are deferred, half a tick's readings to each following tick.
        """
        tick = self.table.tick
        window = tick / 2  # expires again on the next tick
        late = [(p, r) for p in pids if (r := self.registry.late(p)) is not None]
        if len(late) > READINGS_PER_TICK:  # finish what was begun first
            late.sort(key=lambda item: item[1].reading is None)
        for n, (pid, record) in enumerate(late):
            if n >= READINGS_PER_TICK:
                turn = (n - READINGS_PER_TICK) // (READINGS_PER_TICK // 2)
                self.registry.rearm(pid, now, window + turn * tick, record.reading)
                continue
            found = self.examiner.examine(pid, record.watcher, record.reading, now)
            if found.verdict == "watch":
                self.registry.rearm(pid, now, window, found.reading)
            elif found.reason is not None:
                self.hold(pid, found.reason, now, found.words)
            else:
                self.kill(pid, now, dry_run=dry_run, detail=found.words)
                self.policy.killed(now, 1)  # counts toward the storm guard

    def hold(self, pid: int, reason: str, now: float, detail: str) -> None:
        """Hold late ``pid``'s kill: a fresh deadline, counted, logged once."""
        if self.registry.hold(pid, reason, now):
            late = self.registry.late(pid)
            assert late is not None
            self.holds.started(pid, late, detail)
        self.metrics.kills_held[reason] += 1
        self.registry.rearm(pid, now)

    def kill(self, pid: int, now: float, *, dry_run: bool, detail: str = "") -> None:
        """Hand late ``pid`` to the killer (a dry run re-arms it)."""
        late = self.registry.late(pid)
        if late is None:
            return
        if late.held_since is not None:
            held = f"held {now - late.held_since:.1f} s ({late.reason})"
            detail = f"{detail}; {held}" if detail else held
        why = Why(now - late.since, late.timeout, now, detail)
        self.killer.kill(pid, late.watcher, why, dry_run=dry_run)
        if dry_run:
            self.registry.rearm(pid, now)

    # -- reporting -----------------------------------------------------------

    def readings(self) -> Readings:
        """The gauges that other parts own, read at scrape time (the reader
        thread's counts are collected first, so counters are current)."""
        self.receiver.collect()
        return Readings(
            monitored_pids=len(self.table),
            connected=self.sync.connected,
            watchers=self.registry.watchers,
            excluded_pids=sum(self.registry.excluded.values()),
            kernel_drops=self.table.kernel_drops,
            control_truncated=getattr(self.table, "control_truncated", 0),
            watcher_pids=self.table.watcher_counts(),
        )

    def status(self, now: float | None = None) -> dict[str, Any]:
        """The monitored pids with the age of their last heartbeat, and the
        holds, as JSON data (``now``: monotonic, default the clock's)."""
        now = time.monotonic() if now is None else now
        table = self.table
        metrics = self.metrics
        return {
            "version": self.describe(),
            "monotonic": now,
            "timeout": self.config.timeout,
            "dry_run": self.config.dry_run,
            "connected": self.sync.connected,
            "pids": [
                {
                    "pid": pid,
                    "watcher": table.watcher_of(pid),
                    "age": round(now - self.registry.last_heartbeat(pid), 4),
                }
                for pid in sorted(table.pids())
            ],
            "holds": [
                {
                    "pid": pid,
                    "watcher": late.watcher,
                    "reason": late.reason,
                    "since": late.held_since,
                    "silent_for": round(now - late.since, 4),
                }
                for pid, late in sorted(self.registry.held())
            ],
            "killing": self.registry.killing,
            "excluded": self.registry.excluded,
            "heartbeats": metrics.heartbeats,
            "datagrams": metrics.datagrams,
            "unknown": metrics.unknown,
            "malformed": metrics.malformed,
            "kills": dict(metrics.kills),
            "would_kill": metrics.would_kill,
            "kills_held": sum(metrics.kills_held.values()),
            "kills_held_by_reason": dict(metrics.kills_held),
            "recent_kills": self.diagnostics.recent_kills(),
        }


class _Summary:
    """Rate-limited summaries of ignored datagrams, one line per interval."""

    def __init__(self, metrics: Metrics, first: float) -> None:
        self._metrics = metrics
        self._at = first
        self._seen = (0, 0, 0)  # datagrams, unknown, malformed at the last one

    def maybe_log(self, now: float) -> None:
        if now < self._at:
            return
        self._at = now + SUMMARY_INTERVAL
        m = self._metrics
        datagrams, unknown, malformed = (
            m.datagrams - self._seen[0],
            m.unknown - self._seen[1],
            m.malformed - self._seen[2],
        )
        self._seen = (m.datagrams, m.unknown, m.malformed)
        if not (unknown or malformed):
            return
        # A few heartbeats of pids circusd just replaced are normal (a respawn,
        # a kill under way); malformed datagrams, or mostly unknown ones, are not.
        mostly = malformed or unknown * 10 >= datagrams
        logger.log(
            logging.WARNING if mostly else logging.INFO,
            "ignored in the last %gs: %d heartbeat(s) of unmonitored pids, "
            "%d malformed datagram(s)",
            SUMMARY_INTERVAL,
            unknown,
            malformed,
        )


def _own(reason: str, drops: int) -> str:
    """Words for a hold on the watchdog's side: a stall or kernel drops."""
    if reason == "stall":
        return "the watchdog's own tick ran late"
    return f"the kernel dropped {drops} datagram(s) since the last tick"
