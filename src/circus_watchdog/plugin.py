"""The circus plugin: ``use = circus_watchdog.plugin.WatchDog`` in circus.ini."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from circus.plugins import CircusPlugin

from . import logs, runner
from .circus_ini import plugin_options
from .config import Config, ConfigError

logger = logging.getLogger("circus.watchdog")

REPEAT_EVERY = 60  # seconds between repeats of a start-up error
PARENT_CHECK = 1.0  # seconds between checks that circusd is still there
LOG_OPTIONS = ("log_level", "log_output")


class WatchDog(CircusPlugin):  # type: ignore[misc]  # circus has no type hints
    """Kills the processes of matching watchers that stop sending heartbeats.

    A drop-in replacement for ``circus.plugins.watchdog.WatchDog``: each
    monitored process sends a UDP datagram ``PID;TIMESTAMP`` at least every
    ``loop_rate`` seconds; a process silent for ``loop_rate * max_count``
    seconds is killed through circusd (which respawns it).

    Options of the original, same names, meanings and defaults:

    - **loop_rate** -- seconds between expected heartbeats (default: 60)
    - **watchers_regex** -- watchers to monitor, ``re.match`` (default: ".*");
      the watcher running this plugin is never monitored
    - **msg_regex** -- heartbeat format, a named group ``pid`` required
      (default: "^(?P<pid>.*);(?P<timestamp>.*)$", parsed in compiled code)
    - **max_count** -- silent loop_rates before the kill (default: 3)
    - **ip** -- address to listen on (default: 127.0.0.1)
    - **port** -- UDP port to listen on (default: 1664)
    - **watchers_stop_signal** -- signal for the kill (default: the watcher's)
    - **watchers_graceful_timeout** -- seconds before SIGKILL (default: the
      watcher's)
    - **log_level** -- the plugin's log level (default: info)
    - **log_output** -- a file or ``syslog://`` URL for the plugin's log
      (default: "-", where circusd logs; warnings and errors always go there)

    New options (see docs/configuration.md): **tick** (default: loop_rate / 10,
    at most 1 s), **metrics_port** (default: off), **dry_run** (default: false),
    **storm_guard** (default: true), **max_kill_fraction** (default: 0.5),
    **storm_floor** (default: 2), **rcvbuf** (default: 8M), **budget**
    (default: 4096), **resync_interval** (default: 60), **call_timeout**
    (default: 5), **unix_socket** (default: off; with ``use_sockets = True``
    an inherited circusd ``[socket:NAME]`` bound there is used), **max_age**
    (default: off), **grace** (default: the timeout), **watcher_timeouts**
    (default: none),
    **diagnostic_signal** (default: off), **diagnostic_delay** (default: 2).
    """

    name = "watchdog"

    def __init__(
        self,
        endpoint: str,
        pubsub_endpoint: str,
        check_delay: float,
        ssh_server: str | None = None,
        **config: Any,
    ) -> None:
        super().__init__(
            endpoint, pubsub_endpoint, check_delay, ssh_server=ssh_server, **config
        )
        self.loop.close()  # circus made a tornado loop; the engine runs its own
        self._stopped = threading.Event()
        self._stop: Callable[[], None] | None = None
        # A bad option is reported by start(), where circusd's log is reached:
        # circus runs this constructor outside any handler, so an exception here
        # would only reach the plugin's stderr, which circus discards.
        # Warnings wait for start() too: logging is not set up yet.
        self.watchdog_config: Config | None = None
        self.error: str | None = None
        source = f"[{config.get('name', 'plugin:' + self.name)}]"
        options, self.warnings = plugin_options(config, source)
        try:
            if ssh_server:
                raise ConfigError(
                    "ssh_server: circus-watchdog does not tunnel over ssh"
                )
            self.watchdog_config = Config.from_options(
                options, endpoint=endpoint, pubsub_endpoint=pubsub_endpoint
            )
        except ConfigError as exc:
            self.error = str(exc)

    def start(self) -> None:
        """Run the watchdog until SIGTERM, stop(), or circusd's exit.

        If it cannot start (a bad option, a port taken) it says so in circusd's
        log and stays up doing nothing, repeating the error every
        ``REPEAT_EVERY`` seconds: a plugin that exits is respawned by circusd at
        once, and its error would scroll by unseen.
        """
        self.running = True
        try:
            config = self._configure_logging()
            if config is None:
                return
            try:
                runner.run(
                    config,
                    parent_pid=os.getppid(),  # circusd: when it dies, so do we
                    stop_setter=self._set_stopper,
                )
            except OSError as exc:
                self._idle(runner.error_line(exc))
        finally:
            self.running = False

    def _configure_logging(self) -> Config | None:
        """Log as configured and return the config; else report why, and idle."""
        config = self.watchdog_config
        try:
            if config is None:
                # Another option is bad: log_output and log_level may be good.
                options = {k: v for k, v in self.config.items() if k in LOG_OPTIONS}
                logs.configure(Config.from_options(options), plugin=True)
            else:
                logs.configure(config, plugin=True)
        except ConfigError as exc:
            self.error = self.error or str(exc)
            logs.configure_plugin_default()
        for warning in self.warnings:
            logger.warning("%s", warning)
        if config is not None and self.error is None:
            return config
        self._idle(self.error or "no configuration")
        return None

    def _idle(self, error: str) -> None:
        if threading.current_thread() is threading.main_thread():
            # circus stops a plugin with SIGTERM (an event loop that ran may
            # have left a handler of its own behind).
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, lambda *_: self._stopped.set())
        parent = os.getppid()
        next_report = 0.0
        while not self._stopped.is_set() and os.getppid() == parent:
            now = time.monotonic()
            if now >= next_report:
                logger.error(
                    "circus-watchdog cannot start: %s; nothing is watched "
                    "(repeated every %g s until the plugin is fixed and restarted)",
                    error,
                    REPEAT_EVERY,
                )
                next_report = now + REPEAT_EVERY
            self._stopped.wait(PARENT_CHECK)

    def _set_stopper(self, stop: Callable[[], None]) -> None:
        self._stop = stop

    def stop(self) -> None:
        """Ask a running watchdog to stop (thread-safe)."""
        self._stopped.set()
        if self._stop is not None:
            self._stop()
