"""The circus plugin: ``use = circus_watchdog.plugin.WatchDog`` in circus.ini."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from circus.plugins import CircusPlugin

if TYPE_CHECKING:
    from .config import Config

# circusd imports this module in its own process, to check that ``use`` names
# a class, and keeps it: the watchdog's own modules are imported in the
# methods below, which run in the plugin's process.  At the top they cost
# circusd about 7 MB, which every process it then forks pays for.

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

    Every option, with its default (the original's ten first, same names,
    meanings and defaults; the rest in docs/configuration.md):

    - **loop_rate** -- seconds between expected heartbeats (default: ``60``)
    - **max_count** -- silent loop_rates before the kill (default: ``3``)
    - **watchers_regex** -- watchers to monitor, ``re.match``; the watcher
      running this plugin is never monitored (default: ``.*``)
    - **msg_regex** -- heartbeat format, a named group ``pid`` required; the
      default is parsed in compiled code
      (default: ``^(?P<pid>.*);(?P<timestamp>.*)$``)
    - **ip** -- address to listen on (default: ``127.0.0.1``)
    - **port** -- UDP port to listen on, 0 for none (default: ``1664``)
    - **watchers_stop_signal** -- signal for the kill
      (default: the watcher's stop_signal)
    - **watchers_graceful_timeout** -- seconds before SIGKILL
      (default: the watcher's graceful_timeout)
    - **log_level** -- the plugin's log level (default: ``info``)
    - **log_output** -- a file or ``syslog://`` URL for the plugin's log;
      ``-`` is where circusd logs, which also gets warnings and errors
      (default: ``-``)
    - **unix_socket** -- sd_notify socket path or ``@NAME``; with
      ``use_sockets = True`` an inherited circusd ``[socket:NAME]`` bound
      there is used (default: off)
    - **notify_access** -- ``main`` or ``all`` sd_notify senders
      (default: ``main``)
    - **max_age** -- seconds a UDP heartbeat's timestamp may be off
      (default: off)
    - **grace** -- seconds before a new process's first heartbeat is due
      (default: the timeout)
    - **watcher_timeouts** -- ``REGEX=SECONDS,...`` per watcher (default: none)
    - **include_circus** -- monitor circus's own processes (default: ``false``)
    - **dry_run** -- log and count kills, kill nothing (default: ``false``)
    - **storm_guard** -- hold kills when too many would die (default: ``true``)
    - **max_kill_fraction** -- storm guard's fraction (default: ``0.5``)
    - **storm_floor** -- storm guard's floor (default: ``2``)
    - **diagnostic_signal** -- signal sent before a kill (default: off)
    - **diagnostic_delay** -- seconds from it to the kill (default: ``2``)
    - **diagnostic_command** -- command run before a kill; double-quote it in
      circus.ini (default: off)
    - **diagnostic_timeout** -- seconds it may run (default: ``10``)
    - **diagnostic_dir** -- where its output is kept (default: off)
    - **diagnostic_keep** -- files kept there (default: ``100``)
    - **diagnostic_concurrency** -- runs at once (default: ``2``)
    - **call_timeout** -- seconds to wait for circusd (default: ``5``)
    - **resync_interval** -- seconds between full re-syncs (default: ``300``)
    - **metrics_port** -- TCP port of /metrics and /status on metrics_host
      (default: off)
    - **metrics_host** -- address of the metrics server
      (default: ``127.0.0.1``)
    - **tick** -- seconds between deadline checks
      (default: min(loop_rate / 10, 1))
    - **budget** -- datagrams read in one pass (default: ``4096``)
    - **rcvbuf** -- UDP receive buffer in bytes (default: ``8M``)
    - **batch_delay** -- shortest wait between drains under a flood
      (default: ``0.001``)
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
        from .circus_ini import plugin_options  # noqa: PLC0415 - see the top
        from .config import Config, ConfigError  # noqa: PLC0415

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
        from . import runner  # noqa: PLC0415 - see the top of this module

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
        from . import logs  # noqa: PLC0415 - see the top of this module
        from .config import Config, ConfigError  # noqa: PLC0415

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
