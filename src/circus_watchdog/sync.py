"""Keeps the registry in step with circusd; the one owner of "connected".

- A re-sync reads every watcher's pids with ``list`` (one call for the names,
  one per wanted watcher) and hands them to the registry.  It runs at start,
  after each reconnection (then with fresh timeouts: our view may be stale)
  and every ``resync_interval`` seconds.  A failed one is retried with
  back-off.
- Events (``spawn``, ``reap``, ``kill``) go to the registry as they come.
- A watcher-level event (``start``, ``stop``, ``add``, ``remove``, ``reload``,
  ``updated``) re-lists that watcher alone (``list name=W``): events that come
  within ``GATHER`` seconds are listed once.  ``start`` does not, for a watcher
  that the last listing of it found: its ``spawn`` events bring its pids.  So
  circusd starting its watchers answers no listing beyond the first re-sync
  (each listing costs circusd a ``/proc`` read per process: circus 0.19's
  ``list`` asks every process its status).  A listing that finds no
  such watcher is taken once more ``SETTLE`` seconds later: circusd registers
  a watcher that ``reloadconfig`` re-created only after its ``start`` event,
  and a listing taken before that finds no such watcher (its pids would then
  stay unmonitored until the next re-sync).  So after any watcher operation
  the monitored set is circusd's within a second.
- Heartbeats from pids that are not monitored (``unknown``) ask for a re-sync
  (the receiver calls `Sync.unknown_seen` when a read finds one: no polling),
  at most every ``UNKNOWN_RELIST`` seconds; while such re-syncs find nothing
  new the gap doubles, up to ``resync_interval``, so forged pids cannot make
  circusd answer listings at any rate.  A new process often beats before its
  ``spawn`` event is applied, so within ``UNKNOWN_QUIET`` seconds of a
  ``spawn`` event unknown pids are presumed to be such processes and ask
  nothing, for at most ``UNKNOWN_DEFER`` seconds from the first of them (a
  pause of ``UNKNOWN_QUIET`` in the spawns starts the bound afresh):
  circusd starting a fleet of beating processes answers a full listing every
  ``UNKNOWN_DEFER`` seconds at most, not every ``UNKNOWN_RELIST``.
- ``connected`` is true from a successful re-sync until circusd is lost or a
  re-sync fails: the engine kills nothing unless it is true, so nothing is
  killed on stale state.  While circusd does not answer, a warning says so at
  once and then every ``WARN_INTERVAL`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import Any, Protocol

from .circusd import RESYNC_ACTIONS, CallTimeout, CircusError, Event
from .metrics import Metrics
from .registry import Registry

logger = logging.getLogger("circus.watchdog")

RETRY_MIN, RETRY_MAX = 0.25, 5.0  # seconds of back-off between failed re-syncs
WARN_INTERVAL = 30.0  # seconds between "circusd does not answer" warnings
GATHER = 0.05  # seconds: watcher events this close together, one listing
SETTLE = 0.5  # seconds: a watcher operation's watcher is listed again then
UNKNOWN_RELIST = 2.0  # seconds: the shortest gap between unknown-pid re-syncs
UNKNOWN_QUIET = 2.0  # seconds after a spawn event: unknown pids presumed new
UNKNOWN_DEFER = 10.0  # seconds: the longest unknown pids are presumed new


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
        self._full = True  # a re-sync is wanted (not only watcher listings)
        self._wanted = asyncio.Event()  # wakes run_resyncs
        self._warned_at: float | None = None  # last "does not answer" warning
        # watcher -> (when to list it, loop time; whether it is the SETTLE one)
        self._relists: dict[str, tuple[float, bool]] = {}
        self._listed: set[str] = set()  # watchers their last listing found
        self._next_full = 0.0  # loop time of the next periodic re-sync
        self._unknown = False  # an unknown pid beat since the last re-sync
        self._unknown_gap = UNKNOWN_RELIST
        self._unknown_next = 0.0  # loop time an unknown pid may ask again
        self._for_unknown = False  # the coming re-sync is for unknown pids
        self._unknown_first: float | None = None  # first since the last re-sync
        self._last_spawn = -math.inf  # loop time of the last spawn event
        self.relists = 0  # single-watcher listings so far

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
        self._full = True
        self._wanted.set()

    def unknown_seen(self) -> None:
        """A heartbeat came from a pid that is not monitored: re-sync when
        the unknown-pid gap allows, unless a spawn event may explain it."""
        now = self._now()
        if self._unknown_first is None:
            self._unknown_first = now
        if (
            now - self._last_spawn < UNKNOWN_QUIET
            and now - self._unknown_first < UNKNOWN_DEFER
        ):
            return  # a process whose spawn event came, or is coming
        if not self._unknown:  # the first since the last re-sync: wake up
            self._unknown = True
            self._wanted.set()

    def request_relist(self, watcher: str) -> None:
        """List ``watcher`` soon (and once more after SETTLE seconds)."""
        due, settling = self._relists.get(watcher, (math.inf, True))
        if settling:  # not pending yet: gather what comes in the next GATHER s
            due = self._now() + GATHER
        self._relists[watcher] = (due, False)
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
        learnt = self.registry.apply_listing(listing, self.clock(), fresh=fresh)
        self._listed = set(listing)
        self._full = False
        if fresh:
            self._fresh = False
        if self._for_unknown:  # learnt nothing: forged pids, or other watchers'
            gap = UNKNOWN_RELIST if learnt else 2 * self._unknown_gap
            self._unknown_gap = min(gap, max(self.resync_interval, UNKNOWN_RELIST))
            self._unknown_next = self._now() + self._unknown_gap
            self._for_unknown = False
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
                pids = await self._pids(name)
                if pids is not None:  # gone meanwhile
                    listing[name] = pids
        return listing

    async def _pids(self, watcher: str) -> list[Any] | None:
        # One watcher's pids; None if circusd does not know it (now).
        try:
            reply = await self.client.call("list", name=watcher)
        except CallTimeout:
            raise
        except CircusError:  # "program W not found": removed, or re-created
            self._relists.setdefault(watcher, (self._now() + SETTLE, True))
            return None
        pids = reply.get("pids", [])
        return pids if isinstance(pids, list) else []

    async def relist(self, watcher: str) -> bool:
        """List one watcher and apply it: whether circusd knows it;
        CircusError if circusd fails."""
        self.registry.begin_listing()
        try:
            pids = await self._pids(watcher)
        except BaseException:
            self.registry.abort_listing()
            raise
        self.registry.apply_watcher(watcher, pids, self.clock())
        self.relists += 1
        if pids is None:
            self._listed.discard(watcher)
            return False
        self._listed.add(watcher)
        return True

    async def run_resyncs(self) -> None:
        """Re-sync at once, then on request, every resync_interval and for
        unknown pids; list watchers after their events; retry failures."""
        delay = RETRY_MIN
        self._wanted.set()  # a circusd that never answers must be reported
        while True:
            await self._sleep()
            try:
                await self._due_work()
            except CircusError as exc:
                self._failed(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                self.request_resync()
            else:
                delay = RETRY_MIN

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    async def _sleep(self) -> None:
        # Until a request, a watcher listing or a re-sync is due (one for
        # unknown pids included).
        dues = [self._next_full, *(due for due, _ in self._relists.values())]
        if self._unknown and self.connected:
            dues.append(self._unknown_next)
        wait = min(dues) - self._now()
        if wait > 0 and not self._wanted.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wanted.wait(), wait)
        self._wanted.clear()

    async def _due_work(self) -> None:
        now = self._now()
        if self._unknown and now >= self._unknown_next and not self._full:
            self._full = self._for_unknown = True
        if self._full or now >= self._next_full:
            self._next_full = now + self.resync_interval
            self._unknown, self._unknown_first = False, None
            await self.resync()
        for watcher, entry in sorted(self._relists.items()):
            if entry[0] <= now:
                found = await self.relist(watcher)
                if self._relists.get(watcher) == entry:  # no event meanwhile
                    self._after_relist(watcher, entry, found)

    def _after_relist(
        self, watcher: str, entry: tuple[float, bool], found: bool
    ) -> None:
        if found or entry[1]:  # listed, or the SETTLE listing: done
            del self._relists[watcher]
        else:  # not registered yet (re-created): once more, SETTLE s later
            self._relists[watcher] = (self._now() + SETTLE, True)

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
            listed = event.action == "start" and event.watcher in self._listed
            if self.registry.matches(event.watcher) and not listed:
                self.request_relist(event.watcher)
        else:
            if event.action == "spawn":
                now = self._now()
                if now - self._last_spawn >= UNKNOWN_QUIET:  # spawns resume:
                    self._unknown_first = None  # the bound restarts
                self._last_spawn = now
            self.registry.apply_event(
                event.watcher, event.action, event.data.get("process_pid"), self.clock()
            )

    async def run_events(self, events: Events) -> None:
        """Apply circusd's events as they come."""
        while True:
            self.apply(await events.recv())
