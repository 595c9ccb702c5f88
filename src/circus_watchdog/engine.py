"""The watchdog engine, one for plugin and standalone mode.

It owns the UDP socket (drained on ``add_reader`` with a per-wake-up budget so
the loop stays responsive under a flood), ticks the timing wheel on the
monotonic clock, asks the policy who may die, and talks to circusd: ``list``
at start, after each reconnection and every ``resync_interval``; ``spawn`` /
``reap`` / ``kill`` events in between; ``kill`` for silent pids, with the reply
checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from . import __version__
from ._core import HeartbeatTable, compiled
from .circusd import RESYNC_ACTIONS, CircusError, CommandClient, EventSubscriber
from .config import Config
from .formats import apply_regex, pid_of
from .metrics import Metrics, serve_http
from .policy import KillPolicy

logger = logging.getLogger("circus.watchdog")

SUMMARY_INTERVAL = 10.0  # seconds between summaries of ignored datagrams
KILL_CHECK_DELAY = 1.0  # seconds after circusd's kill reply the pid may linger
KILL_CHECKS = 10
# socket(7), Linux: report the socket's drop count with each datagram; set a
# buffer past net.core.rmem_max (Python's socket module names neither).
SO_RXQ_OVFL = getattr(socket, "SO_RXQ_OVFL", 40)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
RETRY_MIN, RETRY_MAX = 0.25, 5.0  # seconds of back-off between failed re-syncs
CIRCUS_GRACEFUL_TIMEOUT = 30.0  # circus's default graceful_timeout, seconds


def loop_name() -> str:
    """``uvloop`` or ``asyncio``: the event loop this process runs on."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return "uvloop" if _uvloop() is not None else "asyncio"
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def _uvloop() -> Any:
    try:
        import uvloop  # noqa: PLC0415 - optional at run time
    except ImportError:
        return None
    return uvloop


def describe() -> str:
    """The version line: version, core and event loop."""
    return f"circus-watchdog {__version__} core={'c' if compiled else 'py'} " + (
        f"loop={loop_name()}"
    )


class Watchdog:
    """Tracks heartbeats of circusd's processes and kills the silent ones."""

    def __init__(
        self,
        config: Config,
        *,
        exclude_pids: Iterable[int] = (),
        parent_pid: int | None = None,
    ) -> None:
        self.config = config
        self.table = HeartbeatTable(config.timeout, config.tick)
        self.metrics = Metrics()
        self.policy = KillPolicy(
            config.timeout,
            storm_guard=config.storm_guard,
            max_kill_fraction=config.max_kill_fraction,
            storm_floor=config.storm_floor,
        )
        self._pattern = config.msg_pattern
        # Our own process is never monitored, nor is the watcher running it
        # (with watchers_regex = .* the original kills itself as plugin:NAME).
        self._self_pids = {os.getpid(), *exclude_pids}
        self._self_watchers: set[str] = set()
        self._parent_pid = parent_pid
        self._killing: dict[int, str] = {}  # kill asked, not yet confirmed
        # Killed pids that circusd may still list for a moment (it sends no
        # reap for what it kills): a re-sync must not bring them back.
        self._killed: dict[int, float] = {}
        self._known_watchers: set[str] = set()
        self._drops_seen = 0  # kernel drop count at the last tick
        self._churn: dict[int, str] | None = None  # events seen during a re-sync
        self._resync_wanted = asyncio.Event()
        self._fresh = True  # the next re-sync gives every pid a fresh timeout
        self._synced = False
        self._stop: asyncio.Event | None = None
        self._client: CommandClient | None = None
        self._sock: socket.socket | None = None
        self._unix: socket.socket | None = None
        self._kill_tasks: set[asyncio.Task[None]] = set()
        self.address: tuple[str, int] | None = None
        self.metrics_address: tuple[str, int] | None = None

    # -- start and stop ------------------------------------------------------

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.config.ip else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self._set_rcvbuf(sock)
            sock.bind((self.config.ip, self.config.port))
        except OSError as exc:
            sock.close()
            raise OSError(
                exc.errno,
                f"cannot bind the heartbeat socket to ip {self.config.ip} "
                f"port {self.config.port}: {exc.strerror}",
            ) from None
        sock.setblocking(False)
        with contextlib.suppress(OSError):  # Linux only: drops are then unseen
            sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
        return sock

    def _bind_unix(self, path: str) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        address = "\0" + path[1:] if path.startswith("@") else path
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            self._set_rcvbuf(sock)
            if not path.startswith("@") and _is_socket(path):
                os.unlink(path)  # left by a previous run; never unlink a file
            sock.bind(address)
            if not path.startswith("@"):
                os.chmod(path, 0o666)  # watchers may run as other users
        except OSError as exc:
            sock.close()
            raise OSError(
                exc.errno, f"cannot bind unix_socket {path}: {exc.strerror}"
            ) from None
        sock.setblocking(False)
        return sock

    def _set_rcvbuf(self, sock: socket.socket) -> None:
        want = self.config.rcvbuf
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, want)
        # Linux reports twice what it grants (the rest is bookkeeping).
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2 >= want:
            return
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError):  # needs CAP_NET_ADMIN
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, want)
        got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2
        if got < want:
            logger.warning(
                "rcvbuf: asked for %d bytes, the kernel granted %d; raise "
                "net.core.rmem_max (sysctl -w net.core.rmem_max=%d) or run with "
                "CAP_NET_ADMIN, or heartbeats may be dropped under load",
                want,
                got,
                want,
            )

    async def run(self, stop: asyncio.Event) -> None:
        """Watch until ``stop`` is set; raises OSError if the port is taken."""
        loop = asyncio.get_running_loop()
        self._stop = stop
        self.metrics.info = {
            "version": __version__,
            "core": "c" if compiled else "py",
            "loop": loop_name(),
        }
        config = self.config
        if config.port:
            self._sock = self._bind()
            self.address = self._sock.getsockname()[:2]
        try:
            if config.unix_socket is not None:
                self._unix = self._bind_unix(config.unix_socket)
        except OSError:
            if self._sock is not None:
                self._sock.close()
            raise
        client = self._client = CommandClient(
            self.config.endpoint,
            timeout=self.config.call_timeout,
            on_connect=self._on_connect,
            on_disconnect=self._on_disconnect,
        )
        events = EventSubscriber(self.config.pubsub_endpoint)
        server: asyncio.Server | None = None
        tasks: list[asyncio.Task[None]] = []
        try:
            await events.start()
            await client.start()
            if self.config.metrics_port:
                server = await serve_http(
                    "127.0.0.1",
                    self.config.metrics_port,
                    self.render_metrics,
                    self.status,
                )
                self.metrics_address = server.sockets[0].getsockname()[:2]
            if self._sock is not None:
                loop.add_reader(self._sock.fileno(), self._on_readable)
            if self._unix is not None:
                loop.add_reader(self._unix.fileno(), self._on_notify)
            tasks = [
                asyncio.create_task(self._tick_loop(), name="tick"),
                asyncio.create_task(self._event_loop(events), name="events"),
                asyncio.create_task(self._resync_loop(), name="resync"),
            ]
            logger.info(
                "%s listening on %s, circusd %s, timeout %gs, tick %gs%s",
                describe(),
                " and ".join(self._listening()),
                self.config.endpoint,
                self.config.timeout,
                self.config.tick,
                " (dry run: nothing will be killed)" if self.config.dry_run else "",
            )
            stopper = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait(
                [stopper, *tasks], return_when=asyncio.FIRST_COMPLETED
            )
            stopper.cancel()
            for task in done:
                if task is not stopper:
                    task.result()  # a crashed task: raise it
        finally:
            for listener in (self._sock, self._unix):
                if listener is not None:
                    loop.remove_reader(listener.fileno())
            for task in [*tasks, *self._kill_tasks]:
                task.cancel()
            await asyncio.gather(*tasks, *self._kill_tasks, return_exceptions=True)
            if server is not None:
                server.close()
                await server.wait_closed()
            await events.close()
            await client.close()
            for listener in (self._sock, self._unix):
                if listener is not None:
                    listener.close()
            path = config.unix_socket
            if self._unix is not None and path and _is_socket(path):
                os.unlink(path)
            logger.info("watchdog stopped")

    def _listening(self) -> list[str]:
        out = []
        if self.address is not None:
            out.append(f"udp {self.address[0]}:{self.address[1]}")
        if self.config.unix_socket is not None:
            out.append(f"unix {self.config.unix_socket}")
        return out

    # -- heartbeats ----------------------------------------------------------

    def _on_readable(self) -> None:
        assert self._sock is not None
        now = time.monotonic()
        try:
            if self._pattern is None:
                max_age = self.config.max_age
                counts = self.table.drain(
                    self._sock,
                    now,
                    self.config.budget,
                    max_age or 0.0,
                    time.time() if max_age else 0.0,  # wall clock only if checked
                )
            else:
                payloads, oversized = self.table.drain_raw(
                    self._sock, self.config.budget
                )
                counts = apply_regex(self._pattern, self.table, payloads, now)
                self.metrics.datagrams += oversized
                self.metrics.malformed += oversized
        except OSError as exc:  # the socket, never a datagram's content
            logger.error("reading the heartbeat socket failed: %s", exc)
            return
        self.metrics.count_drain(counts)

    def _on_notify(self) -> None:
        assert self._unix is not None
        try:
            counts = self.table.drain_notify(
                self._unix, time.monotonic(), self.config.budget
            )
        except OSError as exc:
            logger.error("reading unix_socket failed: %s", exc)
            return
        self.metrics.count_drain(counts)

    # -- ticks ---------------------------------------------------------------

    async def _tick_loop(self) -> None:
        tick = self.config.tick
        due = time.monotonic() + tick
        summary_at = time.monotonic() + SUMMARY_INTERVAL
        ignored = (0, 0)
        while True:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            now = time.monotonic()
            stalled = now - due > tick  # late by more than one tick: we froze
            due = max(due + tick, now)
            if self._parent_pid is not None and os.getppid() != self._parent_pid:
                logger.warning("circusd (pid %d) is gone: exiting", self._parent_pid)
                assert self._stop is not None
                self._stop.set()
                return
            self._tick(now, stalled)
            if now >= summary_at:
                summary_at = now + SUMMARY_INTERVAL
                ignored = self._summarize(ignored)

    def _tick(self, now: float, stalled: bool) -> None:
        self.metrics.monitored_pids = len(self.table)
        if not (self._synced and self.metrics.connected):
            return  # never kill on stale state: wait for a fresh list
        drops = self.table.kernel_drops - self._drops_seen
        if drops > 0:
            self._drops_seen += drops
            self.metrics.kernel_drops += drops
        silent = self.table.expire(now)
        if not silent:
            return
        if stalled:
            self.metrics.stalls += 1
        elif drops > 0:
            logger.warning(
                "the kernel dropped %d datagram(s) since the last tick (raise "
                "rcvbuf and net.core.rmem_max): not killing %d silent pid(s) now",
                drops,
                len(silent),
            )
        decision = self.policy.decide(
            now, silent, len(self.table), stalled=stalled or drops > 0
        )
        self.metrics.kills_held += decision.held
        for pid, watcher in decision.rearm:
            self.table.add(pid, watcher, now)
        for pid, watcher in decision.kill:
            self._kill(pid, watcher, now)
        self.metrics.monitored_pids = len(self.table)

    def _summarize(self, before: tuple[int, int]) -> tuple[int, int]:
        unknown = self.metrics.unknown - before[0]
        malformed = self.metrics.malformed - before[1]
        if unknown or malformed:
            logger.warning(
                "ignored in the last %gs: %d heartbeat(s) of unmonitored pids, "
                "%d malformed datagram(s)",
                SUMMARY_INTERVAL,
                unknown,
                malformed,
            )
        return self.metrics.unknown, self.metrics.malformed

    # -- kills ---------------------------------------------------------------

    def _kill(self, pid: int, watcher: str, now: float) -> None:
        silent_for = self.config.timeout  # at least: it just expired
        if self.config.dry_run:
            self.metrics.would_kill += 1
            logger.warning(
                "dry run: would kill %s pid %d (no heartbeat for over %gs)",
                watcher,
                pid,
                silent_for,
            )
            self.table.add(pid, watcher, now)  # report it again next timeout
            return
        logger.warning(
            "killing %s pid %d: no heartbeat for over %gs", watcher, pid, silent_for
        )
        self._killing[pid] = watcher
        task = asyncio.create_task(self._call_kill(pid, watcher))
        self._kill_tasks.add(task)
        task.add_done_callback(self._kill_tasks.discard)

    async def _call_kill(self, pid: int, watcher: str) -> None:
        assert self._client is not None
        props: dict[str, Any] = {"name": watcher, "pid": pid}
        if self.config.watchers_stop_signal is not None:
            props["signum"] = self.config.watchers_stop_signal
        graceful = self.config.watchers_graceful_timeout
        if graceful is not None:
            props["graceful_timeout"] = graceful
        # circusd answers once the process is gone, up to graceful_timeout
        # later (then it SIGKILLs), so the reply may take that long.
        wait = self.config.call_timeout + (
            CIRCUS_GRACEFUL_TIMEOUT if graceful is None else graceful
        )
        try:
            if self.config.diagnostic_signal is not None:
                await self._diagnose(pid, watcher, self.config.diagnostic_signal)
            await self._client.call("kill", timeout=wait, **props)
            # circusd answers "ok" for a pid it no longer knows, too.
            for _ in range(KILL_CHECKS):
                if not _alive(pid):
                    break
                await asyncio.sleep(KILL_CHECK_DELAY / KILL_CHECKS)
            else:
                raise CircusError("kill", f"pid {pid} still runs after the kill")
        except CircusError as exc:
            self.metrics.kill_failures += 1
            logger.error("circusd did not kill %s pid %d: %s", watcher, pid, exc)
        else:
            self.metrics.kills[watcher] += 1
        finally:
            self._killing.pop(pid, None)
            self._killed[pid] = time.monotonic()

    async def _diagnose(self, pid: int, watcher: str, signum: int) -> None:
        assert self._client is not None
        try:
            await self._client.call("signal", name=watcher, pid=pid, signum=signum)
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

    # -- circusd -------------------------------------------------------------

    def _on_connect(self) -> None:
        logger.info("connected to circusd at %s", self.config.endpoint)
        self.metrics.connected = 1
        self.request_resync(fresh=True)

    def _on_disconnect(self) -> None:
        logger.warning("lost circusd at %s; holding kills", self.config.endpoint)
        self.metrics.connected = 0
        self._synced = False

    def request_resync(self, *, fresh: bool = False) -> None:
        """Re-read the pids from circusd soon; ``fresh`` restarts every timeout."""
        self._fresh = self._fresh or fresh
        self._resync_wanted.set()

    async def _resync_loop(self) -> None:
        delay = RETRY_MIN
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    self._resync_wanted.wait(), self.config.resync_interval
                )
            self._resync_wanted.clear()
            try:
                await self._resync()
            except CircusError as exc:
                logger.warning("re-sync with circusd failed (%s); retrying", exc)
                self._synced = False
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                self._resync_wanted.set()
            else:
                delay = RETRY_MIN

    async def _resync(self) -> None:
        assert self._client is not None
        fresh = self._fresh
        self._churn = {}
        try:
            found = await self._list_pids()
        finally:
            churn, self._churn = self._churn, None
        now = time.monotonic()
        for pid in self.table.pids():
            if pid not in found and pid not in churn:
                self.table.remove(pid)
        for pid in [p for p in self._killed if p not in found]:
            del self._killed[pid]  # gone from circusd's list: nothing to guard
        for pid, watcher in found.items():
            self._learn_watcher(watcher)
            if pid in churn or pid in self._killing or pid in self._killed:
                continue  # an event since `list` knows better
            if fresh or pid not in self.table or self.table.watcher_of(pid) != watcher:
                self.table.add(pid, watcher, now)
        if fresh:
            self._fresh = False
        self._synced = True
        self.metrics.connected = 1
        self.metrics.resyncs += 1
        self.metrics.monitored_pids = len(self.table)
        logger.info(
            "synced with circusd: %d pid(s) monitored%s",
            len(self.table),
            " (fresh timeouts)" if fresh else "",
        )

    async def _list_pids(self) -> dict[int, str]:
        assert self._client is not None
        listing = await self._client.call("list")
        found: dict[int, str] = {}
        for name in listing.get("watchers", []):
            if not self.config.watchers_regex.match(name):
                continue
            reply = await self._client.call("list", name=name)
            pids = [p for p in reply.get("pids", []) if isinstance(p, int)]
            if self._self_pids.intersection(pids):
                self._self_watchers.add(name)
                continue
            found.update((p, name) for p in pids if pid_of(str(p)) is not None)
        return found

    async def _event_loop(self, events: EventSubscriber) -> None:
        while True:
            event = await events.recv()
            if event.action in RESYNC_ACTIONS:
                self.request_resync()
                continue
            name = event.watcher
            pid = event.data.get("process_pid")
            if (
                not isinstance(pid, int)
                or pid_of(str(pid)) is None
                or not self.config.watchers_regex.match(name)
            ):
                continue
            if event.action == "spawn":
                if name in self._self_watchers or pid in self._self_pids:
                    continue
                self._killing.pop(pid, None)
                self._killed.pop(pid, None)  # the pid was reused
                self._learn_watcher(name)
                self.table.add(pid, name, time.monotonic(), self.config.grace)
            elif event.action in ("reap", "kill"):
                # circusd is stopping it (or has): nothing left to watch.
                self.table.remove(pid)
            else:
                continue
            if self._churn is not None:
                self._churn[pid] = event.action
            self.metrics.monitored_pids = len(self.table)

    def _learn_watcher(self, name: str) -> None:
        if name not in self._known_watchers:
            self._known_watchers.add(name)
            timeout = self.config.timeout_of(name)
            if timeout != self.config.timeout:
                self.table.set_watcher_timeout(name, timeout)

    # -- reporting -----------------------------------------------------------

    def render_metrics(self) -> str:
        """Prometheus text of the current counters."""
        self.metrics.monitored_pids = len(self.table)
        return self.metrics.render()

    def status(self) -> dict[str, Any]:
        """The monitored pids with the age of their last heartbeat, as JSON data."""
        now = time.monotonic()
        pids = sorted(self.table.pids())
        return {
            "version": describe(),
            "timeout": self.config.timeout,
            "dry_run": self.config.dry_run,
            "connected": bool(self.metrics.connected),
            "pids": [
                {
                    "pid": pid,
                    "watcher": self.table.watcher_of(pid),
                    "age": round(now - self.table.last_seen(pid), 3),
                }
                for pid in pids
            ],
            "killing": sorted(self._killing),
            "heartbeats": self.metrics.heartbeats,
            "datagrams": self.metrics.datagrams,
            "unknown": self.metrics.unknown,
            "malformed": self.metrics.malformed,
            "kills": dict(self.metrics.kills),
            "would_kill": self.metrics.would_kill,
            "kills_held": self.metrics.kills_held,
        }


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:  # a zombie is dead, only not yet reaped by circusd
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except OSError:
        return True  # no /proc (macOS): trust kill(0)


def run(
    config: Config,
    *,
    parent_pid: int | None = None,
    stop_setter: Callable[[Callable[[], None]], None] | None = None,
) -> None:
    """Run a watchdog on uvloop (asyncio if absent) until SIGINT or SIGTERM.

    ``stop_setter`` receives a thread-safe function that stops it.
    """

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        if stop_setter is not None:
            stop_setter(lambda: _call_soon(loop, stop.set))
        await Watchdog(config, parent_pid=parent_pid).run(stop)

    run_on_best_loop(main())


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[[], None]) -> None:
    loop.call_soon_threadsafe(fn)


def run_on_best_loop(coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` to completion on a new uvloop (asyncio's loop if absent)."""
    uvloop = _uvloop()
    loop = uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(coro)
    finally:
        try:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
