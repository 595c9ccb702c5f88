"""Runs a watchdog as a process: the event loop, signals, the parent watch,
the version line, and ``--check``'s binds.

:func:`check` binds what the daemon would bind and releases it: the UDP
heartbeat socket, the ``unix_socket`` (unless a socket file is already there:
a starting daemon replaces it, so it cannot be told from a stale one) and the
metrics port. It cannot check what only circusd knows (a ``[socket:NAME]``
inherited with ``use_sockets``, whether circusd answers at ``endpoint``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable, Coroutine
from typing import Any

from prometheus_client import CollectorRegistry

from . import engine, metrics, sockets
from .config import Config
from .engine import Watchdog
from .tasks import end

logger = logging.getLogger("circus.watchdog")

PARENT_CHECK = 1.0  # seconds between checks that circusd (our parent) lives


def _uvloop() -> Any:
    try:
        import uvloop  # noqa: PLC0415 - optional at run time
    except ImportError:
        return None
    return uvloop


def loop_name() -> str:
    """``uvloop`` or ``asyncio``: the event loop this process runs (or would run)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return "uvloop" if _uvloop() is not None else "asyncio"
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def describe() -> str:
    """The version line: version, core and event loop."""
    return engine.describe(engine.version_info(loop_name()))


def check(config: Config) -> None:
    """Bind the sockets ``config`` asks for and release them; OSError naming the
    option (the daemon's own message) for the first that cannot be bound."""
    if config.port:
        sockets.bind_udp(config).close()
    path = config.unix_socket
    if path is not None and not sockets.is_socket(path):
        sockets.bind_unix(config).close()
        if not path.startswith("@"):
            os.unlink(path)
    if config.metrics_port:
        port = config.metrics_port

        async def probe() -> None:
            server = await metrics.serve_http(
                config.metrics_host, port, CollectorRegistry(), dict
            )
            server.close()
            await server.wait_closed()

        asyncio.run(probe())


def error_line(exc: OSError) -> str:
    """The one-line message of an OSError that names its option, no "[Errno N]"."""
    plain = os.strerror(exc.errno) if exc.errno else None
    if exc.strerror and exc.strerror != plain:
        return str(exc.strerror)
    return str(exc)


def run(
    config: Config,
    *,
    parent_pid: int | None = None,
    stop_setter: Callable[[Callable[[], None]], None] | None = None,
) -> None:
    """Run a watchdog on uvloop (asyncio if absent) until SIGINT or SIGTERM,
    or until ``parent_pid`` is no longer our parent (circusd died).

    ``stop_setter`` receives a thread-safe function that stops it.
    """

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        if stop_setter is not None:

            def stop_soon() -> None:
                loop.call_soon_threadsafe(stop.set)

            stop_setter(stop_soon)
        watcher = None
        if parent_pid is not None:
            watcher = asyncio.create_task(watch_parent(parent_pid, stop))
        try:
            await Watchdog(config, loop_name=loop_name()).run(stop)
        finally:
            if watcher is not None:
                watcher.cancel()

    run_on_best_loop(main())


async def watch_parent(parent_pid: int, stop: asyncio.Event) -> None:
    """Set ``stop`` once ``parent_pid`` is no longer our parent."""
    while True:
        await asyncio.sleep(PARENT_CHECK)
        if os.getppid() != parent_pid:
            break
    logger.warning("circusd (pid %d) is gone: exiting", parent_pid)
    stop.set()


def run_on_best_loop(coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` to completion on a new uvloop (asyncio's loop if absent)."""
    uvloop = _uvloop()
    loop = uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(coro)
    finally:
        try:
            loop.run_until_complete(end(asyncio.all_tasks(loop)))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
