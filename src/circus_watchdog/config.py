"""The watchdog's settings: one frozen Config from plugin options, flags or circus.ini.

Every option is one field of :class:`Config`; its metadata (default as the user
would write it, parser, help) drives plugin options, CLI flags and circus.ini
alike, so the three sources cannot disagree.
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import logging
import math
import os
import re
import shlex
import signal
import socket
import string
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import TYPE_CHECKING, Any

from circus.util import LOG_LEVELS, to_bool, to_signum

if TYPE_CHECKING:
    from .circus_ini import CircusIni

__all__ = (
    "DEFAULT_MSG_REGEX",
    "Config",
    "ConfigError",
    "add_arguments",
    "describe_option",
)

logger = logging.getLogger(__name__)

DEFAULT_MSG_REGEX = "^(?P<pid>.*);(?P<timestamp>.*)$"

# Keys circus itself reads from a [plugin:NAME] section, so the original plugin
# never sees them as its own: `use` (plugins.get_plugin_cmd), `name`, `priority`
# and `__name__` (added or cast by circus.config.get_config and StrictConfigParser),
# `active` (CircusPlugin), and every argument of circus.watcher.Watcher, because
# circusd runs the plugin as a watcher built from the whole section.
_CIRCUS_KEYS = frozenset(
    {
        "__name__", "use", "name", "active", "priority", "cmd", "args",
        "numprocesses", "warmup_delay", "working_dir", "shell", "shell_args", "uid",
        "gid", "max_retry", "send_hup", "stop_signal", "stop_children", "env",
        "graceful_timeout", "prereload_fn", "rlimits", "executable", "stdout_stream",
        "stderr_stream", "loop", "singleton", "use_sockets", "copy_env", "copy_path",
        "max_age", "max_age_variance", "hooks", "respawn", "autostart", "on_demand",
        "virtualenv", "virtualenv_py_ver", "stdin_socket", "close_child_stdin",
        "close_child_stdout", "close_child_stderr", "check_flapping",
    }
)  # fmt: skip
_CIRCUS_KEY_PREFIXES = ("stdout_stream.", "stderr_stream.", "hooks.", "rlimit_")

# SO_RCVBUF takes a C int: a larger value would raise OverflowError at bind time.
_MAX_RCVBUF = 2**31 - 1
_SIZE = re.compile(r"(\d+)([KMG]?)", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


class ConfigError(ValueError):
    """A bad setting; the message names the option, the value and what was expected."""


# Parsers take the stripped string a user wrote and return the typed value, or
# raise ValueError whose text says what was expected.
def _float(expected: str, ok: Callable[[float], bool]) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(expected) from None
        if not (math.isfinite(value) and ok(value)):
            raise ValueError(expected)
        return value

    return parse


def _int(expected: str, low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(expected) from None
        if value < low or (high is not None and value > high):
            raise ValueError(expected)
        return value

    return parse


def _optional(
    parse: Callable[[str], Any], off: tuple[str, ...] = ("",)
) -> Callable[[str], Any]:
    return lambda raw: None if raw in off else parse(raw)


def _regex(raw: str) -> re.Pattern[str]:
    try:
        return re.compile(raw)
    except re.error as exc:
        raise ValueError(f"a regular expression ({exc})") from None


def _msg_regex(raw: str) -> str:
    if "pid" not in _regex(raw).groupindex:
        raise ValueError("a regular expression with a named group (?P<pid>...)")
    return raw


def _ip(raw: str) -> str:
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:
        pass
    # A host name, as the original's bind() accepted: resolved once, IPv4 first
    # like its AF_INET socket, so the engine binds an address literal.
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            return str(socket.getaddrinfo(raw, None, family)[0][4][0])
        except (OSError, UnicodeError):
            continue
    raise ValueError("an IP address such as 127.0.0.1 or ::1, or a host name")


def _ip_literal(raw: str) -> str:
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:
        raise ValueError("an IP address such as 127.0.0.1, 0.0.0.0 or ::1") from None


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw.lower() not in choices:
            raise ValueError("one of " + ", ".join(choices))
        return raw.lower()

    return parse


_PLACEHOLDERS = frozenset({"pid", "watcher"})


def _command(raw: str) -> tuple[str, ...]:
    expected = (
        "a command line whose only placeholders are {pid} and {watcher}"
        " (write {{ and }} for literal braces)"
    )
    try:
        words = tuple(shlex.split(raw))
        for word in words:
            for _, name, spec, conv in string.Formatter().parse(word):
                if name is not None and (name not in _PLACEHOLDERS or spec or conv):
                    raise ValueError(expected)
    except ValueError:  # an unpaired quote or brace, or another placeholder
        raise ValueError(expected) from None
    if not words:
        raise ValueError(expected)
    return words


def _writable_dir(raw: str) -> str:
    """A writable directory, created if missing (the surest test that it can be)."""
    path = os.path.abspath(raw)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ValueError(f"a writable directory ({exc.strerror})") from None
    return path


def _signal(raw: str) -> int:
    try:
        signum = int(to_signum(raw))
    except (ValueError, AttributeError):  # to_signum lets AttributeError out
        signum = 0
    # 0 would make circusd's kill a no-op; an unknown number fails only at kill time.
    if signum not in signal.valid_signals():
        raise ValueError("a signal name or number such as TERM, SIGKILL or 9")
    return signum


def _log_level(raw: str) -> str:
    if raw.lower() not in LOG_LEVELS:
        raise ValueError("one of " + ", ".join(sorted(LOG_LEVELS)))
    return raw.lower()


def _text(raw: str) -> str:
    if not raw:
        raise ValueError("a non-empty value")
    return raw


def split_tcp(address: str) -> tuple[str, str]:
    """``HOST:PORT`` or ``[IPV6]:PORT`` (a tcp endpoint after ``tcp://``) as
    (host, port text); either is empty when missing."""
    host, _, port = address.rpartition(":")
    return (host[1:-1] if host.startswith("[") and host.endswith("]") else host), port


def _endpoint(raw: str) -> str:
    # Checked at start-up: zmq refuses an unknown transport, a tcp address
    # without a port and an ipc endpoint without a path only at connect time,
    # deep in the engine, and accepts a host that does not resolve, then
    # retries it forever in silence.
    expected = "a ZeroMQ endpoint tcp://HOST:PORT or ipc://PATH"
    scheme, sep, address = raw.partition("://")
    if sep and scheme == "ipc" and address:
        return raw
    if not (sep and scheme == "tcp"):
        raise ValueError(expected)
    host, port = split_tcp(address)
    if not (host and port.isdigit() and 0 < int(port) <= 65535):
        raise ValueError(expected + " (with a port from 1 to 65535)")
    try:
        socket.getaddrinfo(host, int(port), proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        raise ValueError(
            f"{expected} whose HOST resolves ({host!r} does not)"
        ) from None
    return raw


def _size(raw: str) -> int:
    expected = "a size in bytes > 0, optionally with a K, M or G suffix, below 2G"
    match = _SIZE.fullmatch(raw)
    if match is None:
        raise ValueError(expected)
    value = int(match[1]) * _SIZE_UNITS[match[2].upper()]
    if not 0 < value <= _MAX_RCVBUF:
        raise ValueError(expected)
    return value


def _socket_path(raw: str) -> str:
    # Absolute: a plugin's working directory is circusd's, easy to get wrong.
    if not (raw.startswith("/") or (raw.startswith("@") and len(raw) > 1)):
        raise ValueError("an absolute path, or @NAME for the abstract namespace")
    return raw


def _watcher_timeouts(raw: str) -> tuple[tuple[re.Pattern[str], float], ...]:
    expected = "comma-separated REGEX=SECONDS pairs with SECONDS > 0"
    pairs = []
    for item in filter(None, (part.strip() for part in raw.split(","))):
        pattern, sep, seconds = item.rpartition("=")
        if not (sep and pattern):
            raise ValueError(expected)
        try:
            value = float(seconds)
        except ValueError:
            raise ValueError(expected) from None
        if not (math.isfinite(value) and value > 0):
            raise ValueError(expected)
        pairs.append((_regex(pattern), value))
    return tuple(pairs)


def _bool(raw: str) -> bool:
    try:
        return bool(to_bool(raw))
    except ValueError:
        raise ValueError("a boolean: true/false, yes/no, on/off or 1/0") from None


_SECONDS = _float("a number of seconds > 0", lambda v: v > 0)


@dataclass(frozen=True)
class _Option:
    default: str  # written as a user would, and parsed like user input
    parse: Callable[[str], Any]
    help: str  # meaning and unit; add_arguments appends the default
    metavar: str | None = None
    flag: str = ""  # "" means "--" + the name with dashes
    plugin: bool = True  # False: circus passes it to a plugin as an argument
    shown_default: str = ""  # for help, when the default string says too little


def _opt(default: str, parse: Callable[[str], Any], text: str, **kw: Any) -> Any:
    return field(metadata={"option": _Option(default, parse, text, **kw)})


@dataclass(frozen=True)
class Config:
    """Every watchdog setting, validated; build it with from_options or from_args."""

    # The original circus.plugins.watchdog.WatchDog's options: names and defaults.
    loop_rate: float = _opt(
        "60", _SECONDS, "heartbeat period in seconds", metavar="SECONDS"
    )
    watchers_regex: re.Pattern[str] = _opt(
        ".*",
        _regex,
        "regex matched (re.match) against watcher names: whose processes to watch",
        metavar="REGEX",
    )
    msg_regex: str = _opt(
        DEFAULT_MSG_REGEX,
        _msg_regex,
        "regex decoding a heartbeat datagram; needs a named group pid",
        metavar="REGEX",
    )
    max_count: int = _opt(
        "3",
        _int("an integer >= 1", 1),
        "number of heartbeat periods a process may miss before it is killed",
        metavar="N",
    )
    ip: str = _opt(
        "127.0.0.1",
        _ip,
        "IPv4 or IPv6 address the UDP heartbeat socket binds to",
        metavar="IP",
    )
    port: int = _opt(
        "1664",
        _int("a port number from 0 to 65535", 0, 65535),
        "UDP port of the heartbeat socket; 0 turns UDP off",
        metavar="PORT",
    )
    watchers_stop_signal: int | None = _opt(
        "",
        _optional(_signal),
        "signal (name or number) sent to a silent process",
        metavar="SIGNAL",
        shown_default="the watcher's stop_signal",
    )
    watchers_graceful_timeout: float | None = _opt(
        "",
        _optional(_float("a number of seconds >= 0", lambda v: v >= 0)),
        "seconds circusd waits after that signal before SIGKILL",
        metavar="SECONDS",
        shown_default="the watcher's graceful_timeout",
    )
    log_level: str = _opt(
        "info",
        _log_level,
        "log level: debug, info, warning, error or critical",
        metavar="LEVEL",
    )
    log_output: str = _opt(
        "-",
        _text,
        "log destination: - (stdout), a file path or syslog://...",
        metavar="OUTPUT",
    )
    # circusd's endpoints: circus hands them to a plugin as arguments.
    endpoint: str = _opt(
        "tcp://127.0.0.1:5555",
        _endpoint,
        "circusd's ZeroMQ control endpoint",
        metavar="ENDPOINT",
        plugin=False,
    )
    pubsub_endpoint: str = _opt(
        "tcp://127.0.0.1:5556",
        _endpoint,
        "circusd's ZeroMQ pub/sub endpoint",
        metavar="ENDPOINT",
        flag="--pubsub",
        plugin=False,
    )
    # Options the original does not have.
    tick: float = _opt(
        "",
        _optional(_SECONDS),
        "seconds between deadline checks, at most loop_rate * max_count",
        metavar="SECONDS",
        shown_default="min(loop_rate / 10, 1)",
    )
    budget: int = _opt(
        "4096",
        _int("an integer >= 1", 1),
        "maximum number of datagrams read per event-loop wake-up",
        metavar="N",
    )
    rcvbuf: int = _opt(
        "8M",
        _size,
        "UDP receive buffer in bytes; K, M and G suffixes are powers of 1024",
        metavar="BYTES",
    )
    resync_interval: float = _opt(
        "60",
        _SECONDS,
        "seconds between full re-syncs of monitored pids with circusd (list)",
        metavar="SECONDS",
    )
    call_timeout: float = _opt(
        "5", _SECONDS, "seconds to wait for circusd to answer", metavar="SECONDS"
    )
    metrics_port: int | None = _opt(
        "",
        _optional(_int("a port number from 1 to 65535", 1, 65535), ("", "0")),
        "TCP port serving Prometheus metrics at 127.0.0.1:PORT/metrics; 0 = off",
        metavar="PORT",
        shown_default="off",
    )
    dry_run: bool = _opt("false", _bool, "log and count kills, kill nothing")
    storm_guard: bool = _opt(
        "true", _bool, "hold kills when too many processes would die at once"
    )
    max_kill_fraction: float = _opt(
        "0.5",
        _float("a number > 0 and <= 1", lambda v: 0 < v <= 1),
        "storm guard: largest fraction of monitored pids killed per timeout window",
        metavar="FRACTION",
    )
    storm_floor: int = _opt(
        "2",
        _int("an integer >= 0", 0),
        "storm guard: number of pids that may always die at once",
        metavar="N",
    )
    unix_socket: str | None = _opt(
        "",
        _optional(_socket_path),
        "path of a Unix datagram socket for sd_notify heartbeats (WATCHDOG=1), "
        "the sender's pid taken from the kernel; @NAME for the abstract namespace",
        metavar="PATH",
        shown_default="off",
    )
    max_age: float | None = _opt(
        "",
        _optional(_SECONDS, ("", "0")),
        "ignore (and count) UDP heartbeats whose timestamp is more than this many "
        "seconds old or ahead of the clock; 0 = off",
        metavar="SECONDS",
        shown_default="off",
    )
    grace: float | None = _opt(
        "",
        _optional(_SECONDS),
        "seconds a new process has before its first heartbeat is due",
        metavar="SECONDS",
        shown_default="the timeout",
    )
    watcher_timeouts: tuple[tuple[re.Pattern[str], float], ...] = _opt(
        "",
        _watcher_timeouts,
        "per-watcher timeouts: comma-separated REGEX=SECONDS, first match wins "
        "(re.match on the watcher name)",
        metavar="REGEX=SECONDS,...",
        shown_default="none",
    )
    diagnostic_signal: int | None = _opt(
        "",
        _optional(_signal),
        "signal sent (through circusd) diagnostic_delay seconds before a kill, "
        "so a hung process can dump its stacks, e.g. USR1",
        metavar="SIGNAL",
        shown_default="off",
    )
    diagnostic_delay: float = _opt(
        "2",
        _SECONDS,
        "seconds between diagnostic_signal and the kill",
        metavar="SECONDS",
    )

    metrics_host: str = _opt(
        "127.0.0.1",
        _ip_literal,
        "address the metrics server binds to; anything but loopback is logged "
        "as a warning",
        metavar="IP",
    )
    notify_access: str = _opt(
        "main",
        _choice("main", "all"),
        "which sd_notify senders count for a monitored pid: main (the pid itself) "
        "or all (any process whose parent chain reaches it)",
        metavar="main|all",
    )
    include_circus: bool = _opt(
        "false",
        _bool,
        "also monitor circus's own processes (circusd-stats, plugin:* watchers)",
    )
    batch_delay: float = _opt(
        "0.001",
        _float("a number of seconds from 0 to 0.005", lambda v: 0 <= v <= 0.005),
        "seconds the receiver waits between drains while a flood keeps the socket "
        "busy; 0 = read on every wake-up",
        metavar="SECONDS",
    )
    diagnostic_command: tuple[str, ...] | None = _opt(
        "",
        _optional(_command),
        "command run before a kill, e.g. 'py-spy dump --pid {pid}'; {pid} and "
        "{watcher} are replaced, its output saved in diagnostic_dir",
        metavar="COMMAND",
        shown_default="off",
    )
    diagnostic_timeout: float = _opt(
        "10",
        _SECONDS,
        "seconds diagnostic_command may run before it is killed",
        metavar="SECONDS",
    )
    diagnostic_dir: str | None = _opt(
        "",
        _optional(_writable_dir),
        "directory (created if missing) where diagnostic_command's output is kept",
        metavar="PATH",
        shown_default="off",
    )
    diagnostic_keep: int = _opt(
        "100",
        _int("an integer >= 1", 1),
        "number of diagnostic files kept in diagnostic_dir (oldest removed first)",
        metavar="N",
    )
    diagnostic_concurrency: int = _opt(
        "2",
        _int("an integer >= 1", 1),
        "maximum number of diagnostic_command runs at once",
        metavar="N",
    )

    @property
    def timeout(self) -> float:
        """Seconds of silence after which a process is killed."""
        return self.loop_rate * self.max_count

    def timeout_of(self, watcher: str) -> float:
        """The timeout of ``watcher``'s processes (watcher_timeouts, else timeout)."""
        for pattern, seconds in self.watcher_timeouts:
            if pattern.match(watcher):
                return seconds
        return self.timeout

    @cached_property
    def msg_pattern(self) -> re.Pattern[str] | None:
        """The custom msg_regex compiled once, or None for the default format."""
        if self.msg_regex == DEFAULT_MSG_REGEX:
            return None
        return re.compile(self.msg_regex)

    @classmethod
    def from_options(
        cls,
        options: Mapping[str, str],
        *,
        endpoint: str | None = None,
        pubsub_endpoint: str | None = None,
    ) -> Config:
        """Build from plugin option strings, as circus passes them to a plugin."""
        values = _known_options(options, "plugin options")
        if endpoint is not None:
            values["endpoint"] = endpoint
        if pubsub_endpoint is not None:
            values["pubsub_endpoint"] = pubsub_endpoint
        return cls._from_strings(values)

    @classmethod
    def from_args(cls, ns: argparse.Namespace, ini: CircusIni | None = None) -> Config:
        """Build from parsed flags, over the options and endpoints of ``ini``."""
        values: dict[str, str] = {}
        if ini is not None:
            values = _known_options(ini.options, ini.source)
            values["endpoint"] = ini.endpoint
            values["pubsub_endpoint"] = ini.pubsub_endpoint
        for name in _OPTIONS:
            given = getattr(ns, name, None)
            if isinstance(given, bool):  # BooleanOptionalAction
                values[name] = "true" if given else "false"
            elif given is not None:
                values[name] = given
        return cls._from_strings(values)

    @classmethod
    def _from_strings(cls, values: Mapping[str, str]) -> Config:
        parsed: dict[str, Any] = {}
        for name, option in _OPTIONS.items():
            raw = values.get(name, option.default).strip()
            try:
                parsed[name] = option.parse(raw)
            except ValueError as exc:
                raise ConfigError(_invalid(name, str(exc), raw)) from None
        timeout = parsed["loop_rate"] * parsed["max_count"]
        if parsed["tick"] is None:
            parsed["tick"] = min(parsed["loop_rate"] / 10, 1.0)
        elif parsed["tick"] > timeout:
            expected = f"a number of seconds <= loop_rate * max_count ({timeout:g})"
            raise ConfigError(_invalid("tick", expected, values["tick"].strip()))
        if (
            parsed["max_age"] is not None
            and parsed["msg_regex"] != DEFAULT_MSG_REGEX
            and "timestamp" not in re.compile(parsed["msg_regex"]).groupindex
        ):
            expected = "0 (off) with a msg_regex that has no (?P<timestamp>...) group"
            raise ConfigError(_invalid("max_age", expected, values["max_age"].strip()))
        if parsed["port"] == 0 and parsed["unix_socket"] is None:
            expected = "a port from 1 to 65535 unless unix_socket is set"
            raise ConfigError(_invalid("port", expected, "0"))
        return cls(**parsed)


_OPTIONS: dict[str, _Option] = {f.name: f.metadata["option"] for f in fields(Config)}
_PLUGIN_OPTIONS = [name for name, option in _OPTIONS.items() if option.plugin]


def _flag(name: str) -> str:
    return _OPTIONS[name].flag or "--" + name.replace("_", "-")


def describe_option(key: str) -> str:
    """``key (--flag)`` for one of our options, else ``key``: for error messages."""
    return f"{key} ({_flag(key)})" if key in _OPTIONS else key


def _invalid(name: str, expected: str, raw: str) -> str:
    return f"invalid {name} ({_flag(name)}): expected {expected}, got {raw!r}"


def _known_options(options: Mapping[str, str], source: str) -> dict[str, str]:
    """Keep our options; warn about keys that are neither ours nor circus's."""
    unknown = sorted(
        key
        for key in options
        if key not in _PLUGIN_OPTIONS
        and key not in _CIRCUS_KEYS
        and not key.startswith(_CIRCUS_KEY_PREFIXES)
    )
    if unknown:
        # The original ignores them, and a circus.ini that works with it must
        # keep working, so this is a warning and not an error.
        logger.warning(
            "ignoring unknown option(s) in %s: %s",
            source,
            ", ".join(map(_describe_unknown, unknown)),
        )
    return {key: value for key, value in options.items() if key in _PLUGIN_OPTIONS}


def _describe_unknown(key: str) -> str:
    close = difflib.get_close_matches(key, _PLUGIN_OPTIONS, n=1)
    return f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add a flag for every option (circus_ini.add_arguments adds the file's)."""
    for name, option in _OPTIONS.items():
        # Every default is None so that from_args can tell given flags from the
        # rest: the real defaults live in Config alone.
        shown = option.shown_default or option.default
        help_text = f"{option.help} (default: {shown})".replace("%", "%%")
        if option.parse is _bool:
            parser.add_argument(
                _flag(name),
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        else:
            parser.add_argument(
                _flag(name),
                dest=name,
                default=None,
                metavar=option.metavar,
                help=help_text,
            )
