"""Keeps the registry in step with circusd; the one owner of "connected".

- A re-sync reads every watcher's pids with ``list`` (one call for the names,
  one per wanted watcher) and hands them to the registry.  It runs at start,
  after each reconnection (then with fresh timeouts: our view may be stale),
  every ``resync_interval`` seconds, and after watcher-level events.  A failed
  one is retried with back-off.
- Events (``spawn``, ``reap``, ``kill``) go to the registry as they come.
- ``connected`` is true from a successful re-sync until circusd is lost or a
  re-sync fails: the engine kills nothing unless it is true, so nothing is
  killed on stale state.  While circusd does not answer, a warning says so at
  once and then every ``WARN_INTERVAL`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from .circusd import RESYNC_ACTIONS, CircusError, Event
from .metrics import Metrics
from .registry import Registry

logger = logging.getLogger("circus.watchdog")

RETRY_MIN, RETRY_MAX = 0.25, 5.0  # seconds of back-off between failed re-syncs
WARN_INTERVAL = 30.0  # seconds between "circusd does not answer" warnings


class Caller(Protocol):
    """What sync needs of a circusd client (circusd.CommandClient has it)."""

    async def call(
        self, command: str, *, timeout: float | None = None, **props: Any
    ) -> dict[str, Any]: ...


class Events(Protocol):
    """A source of circusd events (circusd.EventSubscriber is one)."""

    async def recv(self) -> Event: ...


class Sync:
    """Re-syncs and events, feeding the registry."""

    def __init__(
        self,
        client: Caller,
        registry: Registry,
        metrics: Metrics,
        *,
        endpoint: str,
        resync_interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.registry = registry
        self.metrics = metrics
        self.endpoint = endpoint
        self.resync_interval = resync_interval
        self.clock = clock
        self.connected = False
        self._fresh = True  # the next re-sync restarts every timeout
        self._wanted = asyncio.Event()
        self._warned_at: float | None = None  # last "does not answer" warning

    # -- circusd's connection (CommandClient callbacks) ----------------------

    def on_connect(self) -> None:
        """circusd is reachable (again): re-sync with fresh timeouts."""
        logger.info("connected to circusd at %s", self.endpoint)
        self.request_resync(fresh=True)

    def on_disconnect(self) -> None:
        """circusd went away: hold every kill until a fresh re-sync."""
        logger.warning("lost circusd at %s; holding kills", self.endpoint)
        self.connected = False

    def request_resync(self, *, fresh: bool = False) -> None:
        """Re-read the pids soon; ``fresh`` restarts every timeout."""
        self._fresh = self._fresh or fresh
        self._wanted.set()

    # -- re-syncs ------------------------------------------------------------

    async def resync(self) -> None:
        """Read circusd's pids and apply them; CircusError if circusd fails."""
        fresh = self._fresh
        self.registry.begin_listing()
        try:
            listing = await self._listing()
        except BaseException:
            self.registry.abort_listing()
            raise
        self.registry.apply_listing(listing, self.clock(), fresh=fresh)
        if fresh:
            self._fresh = False
        if not self.connected or self._warned_at is not None:
            logger.info(
                "synced with circusd at %s: %d pid(s) monitored%s",
                self.endpoint,
                len(self.registry.table),
                " (fresh timeouts)" if fresh else "",
            )
        self.connected = True
        self._warned_at = None
        self.metrics.resyncs += 1

    async def _listing(self) -> dict[str, list[Any]]:
        names = (await self.client.call("list")).get("watchers", [])
        listing: dict[str, list[Any]] = {}
        for name in names:
            # Excluded watchers are read too: to find the one running us, and
            # to count what is excluded.
            if isinstance(name, str) and self.registry.matches(name):
                reply = await self.client.call("list", name=name)
                pids = reply.get("pids", [])
                listing[name] = pids if isinstance(pids, list) else []
        return listing

    async def run_resyncs(self) -> None:
        """Re-sync at once, then on request and every resync_interval,
        retrying failures."""
        delay = RETRY_MIN
        self._wanted.set()  # a circusd that never answers must be reported
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wanted.wait(), self.resync_interval)
            self._wanted.clear()
            try:
                await self.resync()
            except CircusError as exc:
                self._failed(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                self._wanted.set()
            else:
                delay = RETRY_MIN

    def _failed(self, exc: CircusError) -> None:
        self.connected = False
        now = self.clock()
        if self._warned_at is None or now - self._warned_at >= WARN_INTERVAL:
            self._warned_at = now
            logger.warning(
                "circusd at %s does not answer (%s); nothing will be killed "
                "until it does",
                self.endpoint,
                exc,
            )

    # -- events --------------------------------------------------------------

    def apply(self, event: Event) -> None:
        """Apply one circusd event."""
        if event.action in RESYNC_ACTIONS:
            self.request_resync()
        else:
            self.registry.apply_event(
                event.watcher, event.action, event.data.get("process_pid"), self.clock()
            )

    async def run_events(self, events: Events) -> None:
        """Apply circusd's events as they come."""
        while True:
            self.apply(await events.recv())
