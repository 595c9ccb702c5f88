"""Where the watchdog's log goes: ``log_level`` and ``log_output``.

Standalone, ``log_output`` is ``-`` (stdout), a file (appended to) or a
``syslog://`` URL as circus takes them. As a plugin the log goes where circusd's
own log goes, which circus does not tell its plugins unless ``[circus]
logoutput`` is set: circusd's ``--log-output`` is read from its command line,
and with neither the log goes to circusd's stderr (``/proc/PPID/fd/2``), since
circus sends a plugin's own stderr to /dev/null. A ``log_output`` plugin option
sends the log there instead; its warnings and errors still reach circusd's log.
"""

from __future__ import annotations

import argparse
import errno
import logging
import logging.handlers
import os
import sys
from collections.abc import Sequence
from urllib.parse import urlparse

from circus.config import read_config
from circus.util import LOG_DATE_FMT, LOG_DATE_SYSLOG_FMT, LOG_FMT

from . import procfs
from .config import Config, ConfigError
from .sockets import is_socket

__all__ = ["circusd_log_output", "configure", "configure_plugin_default"]

STDOUT = "-"
DEV_LOG = "/dev/log"


def configure(config: Config, *, plugin: bool = False) -> None:
    """Send the log to ``config.log_output`` at ``config.log_level``.

    Raises ConfigError naming log_output if that place cannot be written.
    As a plugin, ``-`` means where circusd logs (see the module docstring).
    """
    level = logging.getLevelName(config.log_level.upper())
    handlers: list[logging.Handler] = []
    if not plugin or config.log_output != STDOUT:
        handlers.append(_handler(config.log_output))
    if plugin and not _same_file(config.log_output, _circusd_output()):
        to_circusd = _circusd_handler()
        if to_circusd is not None:
            # With a log_output of its own, circusd's log still shows trouble.
            to_circusd.setLevel(level if not handlers else logging.WARNING)
            handlers.append(to_circusd)
    _install(handlers, level)


def configure_plugin_default() -> None:
    """Log where circusd logs, at info: for a plugin whose options are wrong."""
    handler = _circusd_handler()
    _install([] if handler is None else [handler], logging.INFO)


def _install(handlers: list[logging.Handler], level: int) -> None:
    # The root logger, as circus does: it gathers circus.watchdog,
    # circus_watchdog.* and asyncio alike.
    root = logging.getLogger()
    for old in root.handlers:
        old.close()
    root.handlers = handlers
    root.setLevel(level)


def _handler(output: str) -> logging.Handler:
    datefmt = LOG_DATE_FMT
    try:
        if output == STDOUT:
            handler: logging.Handler = logging.StreamHandler(sys.stdout)
        elif output.startswith("syslog://"):
            handler = _syslog(output)
            datefmt = LOG_DATE_SYSLOG_FMT
        else:
            handler = logging.handlers.WatchedFileHandler(output)  # not inherited
    except OSError as exc:
        expected = (
            "a reachable syslog://host[:port][?facility] or syslog:///path[?facility]"
            if output.startswith("syslog://")
            else "a file that can be created or appended to"
        )
        reason = exc.strerror or str(exc)
        raise ConfigError(
            f"invalid log_output (--log-output): expected {expected}, "
            f"got {output!r} ({reason})"
        ) from None
    handler.setFormatter(logging.Formatter(fmt=LOG_FMT, datefmt=datefmt))
    return handler


def _syslog(url: str) -> logging.Handler:
    # The URL forms circus takes: syslog://host[:port]?facility,
    # syslog:///path?facility.
    info = urlparse(url)
    names = logging.handlers.SysLogHandler.facility_names
    facility = info.query if info.query in names else "user"
    address: str | tuple[str, int]
    if info.netloc:
        address = (info.hostname or "localhost", info.port or 514)
    else:
        address = info.path
        if not is_socket(address):  # SysLogHandler would only fail on emit
            raise OSError(errno.ENOTSOCK, "no socket there")
    return logging.handlers.SysLogHandler(address=address, facility=facility)


# -- circusd's log, seen from its plugin ---------------------------------------


def circusd_log_output(
    ppid: int, plugin_argv: Sequence[str], circusd_cmdline: Sequence[str] | None
) -> str:
    """Where circusd ``ppid`` logs: ``-`` (its stderr), a path or syslog URL.

    circusd takes its ``--log-output`` flag over ``[circus] logoutput``, and
    circus passes only the latter to plugins (as their ``--log-output``, and
    not at all to a plugin restarted by ``reloadconfig``): read both flag and
    ini from circusd's command line, then the plugin's own flag.
    """
    flag, ini = _circusd_args(circusd_cmdline or [])
    cwd = procfs.cwd(ppid)
    if flag is None and ini is not None:
        flag = _ini_logoutput(os.path.join(cwd, ini) if cwd else ini)
    output = flag or _plugin_flag(plugin_argv) or STDOUT
    if output == STDOUT or output.startswith("syslog://") or not cwd:
        return output
    return os.path.join(cwd, output)  # relative to circusd's working directory


def _circusd_args(cmdline: Sequence[str]) -> tuple[str | None, str | None]:
    """circusd's ``--log-output`` and config file, parsed as circusd does."""
    args = _after_circusd(list(cmdline))
    if not args:
        return None, None
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    parser.add_argument("config", nargs="?")
    parser.add_argument("--log-output", dest="logoutput")
    for flag in ("--log-level", "--logger-config", "--pidfile"):
        parser.add_argument(flag)  # so that abbreviations resolve as in circusd
    for flag in ("--daemon", "--version"):
        parser.add_argument(flag, action="store_true")
    try:
        ns, _ = parser.parse_known_args(args)
    except (argparse.ArgumentError, SystemExit):
        return None, None
    return ns.logoutput or None, ns.config or None


def _plugin_flag(argv: Sequence[str]) -> str | None:
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    parser.add_argument("--log-output", dest="logoutput")
    try:
        ns, _ = parser.parse_known_args(list(argv))
    except (argparse.ArgumentError, SystemExit):
        return None
    return ns.logoutput or None


def _ini_logoutput(path: str) -> str | None:
    """``[circus] logoutput`` as circusd reads it (includes, substitutions)."""
    try:
        cfg, _ = read_config(path)
        value = cfg.dget("circus", "logoutput", None)
    except Exception:  # noqa: BLE001 - any unreadable ini: fall back to the rest
        return None
    return value if isinstance(value, str) and value else None


def _after_circusd(cmdline: list[str]) -> list[str]:
    """circusd's own arguments: what follows ``circusd`` or ``-m circus.circusd``."""
    for i, arg in enumerate(cmdline):
        if os.path.basename(arg) == "circusd" or (
            arg == "circus.circusd" and i and cmdline[i - 1] == "-m"
        ):
            return cmdline[i + 1 :]
    return []


def _circusd_output() -> str:
    """Where circusd, this process's parent, logs."""
    ppid = os.getppid()
    return circusd_log_output(ppid, sys.argv[1:], procfs.cmdline(ppid))


def _same_file(output: str, other: str) -> bool:
    if STDOUT in (output, other) or "://" in output or "://" in other:
        return False
    return os.path.abspath(output) == os.path.abspath(other)


def _circusd_handler() -> logging.Handler | None:
    """A handler writing where circusd (this process's parent) logs."""
    ppid = os.getppid()
    output = _circusd_output()
    try:
        if output != STDOUT:
            return _handler(output)
        # circusd's stderr, reopened; "a" so as not to write over a file's end.
        handler: logging.Handler = logging.FileHandler(f"/proc/{ppid}/fd/2", "a")
    except ConfigError:
        return None  # circusd could not open it either
    except OSError as exc:
        if exc.errno != errno.ENXIO or not is_socket(DEV_LOG):
            return None  # not Linux
        # A socket: under systemd, the journal's; its syslog socket files the
        # line under circusd's unit all the same.
        return _handler("syslog://" + DEV_LOG)
    handler.setFormatter(logging.Formatter(fmt=LOG_FMT, datefmt=LOG_DATE_FMT))
    return handler
