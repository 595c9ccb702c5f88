"""The watchdog's settings: the option table and the one frozen Config it builds.

Every option is one field of :class:`Config`; its metadata (default as the user
would write it, parser, help, flag) drives plugin options, CLI flags
(:mod:`.cli`) and circus.ini sections (:mod:`.circus_ini`) alike, so the three
sources cannot disagree. Fields are grouped by concern, in the order of
``--help``. :meth:`Config.from_options` is the one constructor from strings; the
parsers live in :mod:`.values`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from . import values as v

__all__ = (
    "DEFAULT_MSG_REGEX",
    "OPTIONS",
    "PLUGIN_OPTIONS",
    "Config",
    "ConfigError",
    "Option",
    "describe_option",
    "did_you_mean",
    "flag",
)

DEFAULT_MSG_REGEX = "^(?P<pid>.*);(?P<timestamp>.*)$"


class ConfigError(ValueError):
    """A bad setting; the message names the option, the value and what was expected."""


@dataclass(frozen=True)
class Option:
    """One row of the option table: how a user writes it and what it means."""

    default: str  # written as a user would, and parsed like user input
    parse: Callable[[str], Any]
    help: str  # meaning and unit; the CLI appends the default
    metavar: str | None = None
    flag: str = ""  # "" means "--" + the name with dashes
    plugin: bool = True  # False: circus passes it to a plugin as an argument
    shown_default: str = ""  # for help, when the default string says too little
    group: str = ""  # set on the first option of each group (a --help heading)
    # For an empty value: the value, from the options before it in the table.
    derive: Callable[[Mapping[str, Any]], Any] | None = None


def _opt(default: str, parse: Callable[[str], Any], text: str, **kw: Any) -> Any:
    return field(metadata={"option": Option(default, parse, text, **kw)})


def _default_tick(parsed: Mapping[str, Any]) -> float:
    return float(min(parsed["loop_rate"] / 10, 1.0))


_SECONDS_OR_ZERO = v.number("a number of seconds >= 0", lambda x: x >= 0)
_COUNT = v.integer("an integer >= 1", 1)


@dataclass(frozen=True)
class Config:
    """Every watchdog setting, validated; build it with from_options."""

    # -- What is watched, and how processes beat (the original's options first).
    loop_rate: float = _opt(
        "60",
        v.seconds,
        "heartbeat period in seconds",
        metavar="SECONDS",
        group="heartbeats: what is watched and how processes beat",
    )
    max_count: int = _opt(
        "3",
        _COUNT,
        "number of heartbeat periods a process may miss before it is killed",
        metavar="N",
    )
    watchers_regex: re.Pattern[str] = _opt(
        ".*",
        v.regex,
        "regex matched (re.match) against watcher names: whose processes to watch",
        metavar="REGEX",
    )
    msg_regex: re.Pattern[str] = _opt(
        DEFAULT_MSG_REGEX,
        v.msg_regex,
        "regex decoding a heartbeat datagram; needs a named group pid",
        metavar="REGEX",
    )
    ip: str = _opt(
        "127.0.0.1",
        v.ip,
        "IPv4 or IPv6 address the UDP heartbeat socket binds to",
        metavar="IP",
    )
    port: int = _opt(
        "1664",
        v.integer("a port number from 0 to 65535", 0, 65535),
        "UDP port of the heartbeat socket; 0 turns UDP off",
        metavar="PORT",
    )
    unix_socket: str | None = _opt(
        "",
        v.optional(v.socket_path),
        "path of a Unix datagram socket for sd_notify heartbeats (WATCHDOG=1), "
        "the sender's pid taken from the kernel; @NAME for the abstract namespace",
        metavar="PATH",
        shown_default="off",
    )
    notify_access: str = _opt(
        "main",
        v.choice("main", "all"),
        "which sd_notify senders count for a monitored pid: main (the pid itself) "
        "or all (any process whose parent chain reaches it)",
        metavar="main|all",
    )
    max_age: float | None = _opt(
        "",
        v.optional(v.seconds, ("", "0")),
        "ignore (and count) UDP heartbeats whose timestamp is more than this many "
        "seconds old or ahead of the clock; 0 = off",
        metavar="SECONDS",
        shown_default="off",
    )
    grace: float | None = _opt(
        "",
        v.optional(v.seconds),
        "seconds a new process has before its first heartbeat is due",
        metavar="SECONDS",
        shown_default="the timeout",
    )
    watcher_timeouts: tuple[tuple[re.Pattern[str], float], ...] = _opt(
        "",
        v.watcher_timeouts,
        "per-watcher timeouts: comma-separated REGEX=SECONDS, first match wins "
        "(re.match on the watcher name)",
        metavar="REGEX=SECONDS,...",
        shown_default="none",
    )
    include_circus: bool = _opt(
        "false",
        v.boolean,
        "also monitor circus's own processes (circusd-stats, plugin:* watchers)",
    )
    # -- How a silent process is killed, and when kills are held.
    watchers_stop_signal: int | None = _opt(
        "",
        v.optional(v.signal_number),
        "signal (name or number) sent to a silent process",
        metavar="SIGNAL",
        shown_default="the watcher's stop_signal",
        group="kills: how a silent process dies, and when kills are held",
    )
    watchers_graceful_timeout: float | None = _opt(
        "",
        v.optional(_SECONDS_OR_ZERO),
        "seconds circusd waits after that signal before SIGKILL",
        metavar="SECONDS",
        shown_default="the watcher's graceful_timeout",
    )
    dry_run: bool = _opt("false", v.boolean, "log and count kills, kill nothing")
    storm_guard: bool = _opt(
        "true", v.boolean, "hold kills when too many processes would die at once"
    )
    max_kill_fraction: float = _opt(
        "0.5",
        v.number("a number > 0 and <= 1", lambda x: 0 < x <= 1),
        "storm guard: largest fraction of monitored pids killed per timeout window",
        metavar="FRACTION",
    )
    storm_floor: int = _opt(
        "2",
        v.integer("an integer >= 0", 0),
        "storm guard: number of pids that may always die at once",
        metavar="N",
    )
    # -- What is kept of a process before its kill.
    diagnostic_signal: int | None = _opt(
        "",
        v.optional(v.signal_number),
        "signal sent (through circusd) diagnostic_delay seconds before a kill, "
        "so a hung process can dump its stacks, e.g. USR1",
        metavar="SIGNAL",
        shown_default="off",
        group="diagnostics: what is kept of a process before its kill",
    )
    diagnostic_delay: float = _opt(
        "2",
        v.seconds,
        "seconds between diagnostic_signal and the kill",
        metavar="SECONDS",
    )
    diagnostic_command: tuple[str, ...] | None = _opt(
        "",
        v.optional(v.command),
        "command run before a kill, e.g. 'py-spy dump --pid {pid}'; {pid} and "
        "{watcher} are replaced, its output saved in diagnostic_dir",
        metavar="COMMAND",
        shown_default="off",
    )
    diagnostic_timeout: float = _opt(
        "10",
        v.seconds,
        "seconds diagnostic_command may run before it is killed",
        metavar="SECONDS",
    )
    diagnostic_dir: str | None = _opt(
        "",
        v.optional(v.writable_dir),
        "directory (created if missing) where diagnostic_command's output is kept",
        metavar="PATH",
        shown_default="off",
    )
    diagnostic_keep: int = _opt(
        "100",
        _COUNT,
        "number of diagnostic files kept in diagnostic_dir (oldest removed first)",
        metavar="N",
    )
    diagnostic_concurrency: int = _opt(
        "2",
        _COUNT,
        "maximum number of diagnostic_command runs at once",
        metavar="N",
    )
    # -- circusd: circus hands a plugin its endpoints as arguments.
    endpoint: str = _opt(
        "tcp://127.0.0.1:5555",
        v.endpoint,
        "circusd's ZeroMQ control endpoint",
        metavar="ENDPOINT",
        plugin=False,
        group="circusd: where it is and how it is followed",
    )
    pubsub_endpoint: str = _opt(
        "tcp://127.0.0.1:5556",
        v.endpoint,
        "circusd's ZeroMQ pub/sub endpoint",
        metavar="ENDPOINT",
        flag="--pubsub",
        plugin=False,
    )
    call_timeout: float = _opt(
        "5", v.seconds, "seconds to wait for circusd to answer", metavar="SECONDS"
    )
    resync_interval: float = _opt(
        "300",
        v.seconds,
        "seconds between full re-syncs of monitored pids with circusd (list)",
        metavar="SECONDS",
    )
    # -- Metrics and status.
    metrics_port: int | None = _opt(
        "",
        v.optional(v.integer("a port number from 1 to 65535", 1, 65535), ("", "0")),
        "TCP port serving Prometheus metrics at http://METRICS_HOST:PORT/metrics "
        "and the monitored pids at /status; 0 = off",
        metavar="PORT",
        shown_default="off",
        group="metrics: Prometheus /metrics and /status",
    )
    metrics_host: str = _opt(
        "127.0.0.1",
        v.ip_literal,
        "address the metrics server binds to; anything but loopback is logged "
        "as a warning",
        metavar="IP",
    )
    # -- Logging.
    log_level: str = _opt(
        "info",
        v.log_level,
        "log level: debug, info, warning, error or critical",
        metavar="LEVEL",
        group="logging",
    )
    log_output: str = _opt(
        "-",
        v.text,
        "log destination: - (stdout), a file path or syslog://...",
        metavar="OUTPUT",
    )
    # -- Tuning: the receive path and the deadline clock.
    tick: float = _opt(
        "",
        v.seconds,
        "seconds between deadline checks, at most loop_rate * max_count",
        metavar="SECONDS",
        shown_default="min(loop_rate / 10, 1)",
        group="tuning: the receive path and the deadline clock",
        derive=_default_tick,
    )
    budget: int = _opt(
        "4096",
        _COUNT,
        "maximum number of datagrams read in one pass (one take of the table's "
        "lock, one event-loop wake-up)",
        metavar="N",
    )
    rcvbuf: int = _opt(
        "8M",
        v.size,
        "UDP receive buffer in bytes; K, M and G suffixes are powers of 1024",
        metavar="BYTES",
    )
    batch_delay: float = _opt(
        "0.001",
        v.number("a number of seconds from 0 to 0.005", lambda x: 0 <= x <= 0.005),
        "shortest wait in seconds between drains while a flood keeps the socket "
        "busy (up to 4 ms, by the traffic); 0 = read on every arrival",
        metavar="SECONDS",
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

    @property
    def msg_pattern(self) -> re.Pattern[str] | None:
        """msg_regex when it is custom, or None for the default format (the
        cores parse it without a regex)."""
        return None if self.msg_regex.pattern == DEFAULT_MSG_REGEX else self.msg_regex

    @classmethod
    def from_options(
        cls,
        options: Mapping[str, str],
        *,
        endpoint: str | None = None,
        pubsub_endpoint: str | None = None,
    ) -> Config:
        """Build from option strings (absent ones take their default).

        ``endpoint`` and ``pubsub_endpoint`` may be given as keywords, as circus
        gives them to a plugin. An unknown key is a ConfigError.
        """
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ConfigError(
                "unknown option(s): "
                + ", ".join(did_you_mean(key, tuple(OPTIONS)) for key in unknown)
            )
        values = dict(options)
        if endpoint is not None:
            values["endpoint"] = endpoint
        if pubsub_endpoint is not None:
            values["pubsub_endpoint"] = pubsub_endpoint
        parsed: dict[str, Any] = {}
        for name, option in OPTIONS.items():
            raw = values.get(name, option.default).strip()
            try:
                if not raw and option.derive is not None:
                    parsed[name] = option.derive(parsed)
                else:
                    parsed[name] = option.parse(raw)
            except ValueError as exc:
                raise ConfigError(_invalid(name, str(exc), raw)) from None
        _check_together(parsed, values)
        return cls(**parsed)


def _check_together(parsed: Mapping[str, Any], values: Mapping[str, str]) -> None:
    """The rules that tie one option to another."""
    timeout = parsed["loop_rate"] * parsed["max_count"]
    if parsed["tick"] > timeout:
        expected = f"a number of seconds <= loop_rate * max_count ({timeout:g})"
        raise ConfigError(_invalid("tick", expected, values["tick"].strip()))
    if (
        parsed["max_age"] is not None
        and "timestamp" not in parsed["msg_regex"].groupindex
    ):
        expected = "0 (off) with a msg_regex that has no (?P<timestamp>...) group"
        raise ConfigError(_invalid("max_age", expected, values["max_age"].strip()))
    if parsed["port"] == 0 and parsed["unix_socket"] is None:
        expected = "a port from 1 to 65535 unless unix_socket is set"
        raise ConfigError(_invalid("port", expected, "0"))


#: The option table, in the order of Config's fields (and of --help).
OPTIONS: dict[str, Option] = {f.name: f.metadata["option"] for f in fields(Config)}
#: The options a [plugin:NAME] section may set (circus passes the endpoints).
PLUGIN_OPTIONS = tuple(name for name, option in OPTIONS.items() if option.plugin)


def flag(name: str) -> str:
    """The command-line flag of option ``name``."""
    return OPTIONS[name].flag or "--" + name.replace("_", "-")


def describe_option(key: str) -> str:
    """``key (--flag)`` for one of our options, else ``key``: for error messages."""
    return f"{key} ({flag(key)})" if key in OPTIONS else key


def did_you_mean(key: str, names: tuple[str, ...] = PLUGIN_OPTIONS) -> str:
    """``'key'``, with a suggestion from ``names`` when it looks like a typo."""
    close = difflib.get_close_matches(key, names, n=1)
    return f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key)


def _invalid(name: str, expected: str, raw: str) -> str:
    return f"invalid {name} ({flag(name)}): expected {expected}, got {raw!r}"
