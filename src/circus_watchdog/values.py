"""Value parsers: the text a user wrote for one option, to its typed value.

Each parser takes the stripped string and returns the value, or raises
ValueError whose text says what was expected; :mod:`.config` adds the option's
name, flag and the value to make the one-line error. They know nothing of the
option table, so any tool can use them (``seconds`` for a duration).
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import shlex
import signal
import socket
import string
import tempfile
from collections.abc import Callable
from typing import TypeVar

from circus.util import LOG_LEVELS, to_bool, to_signum

__all__ = (
    "boolean",
    "choice",
    "command",
    "endpoint",
    "integer",
    "ip",
    "ip_literal",
    "log_level",
    "msg_regex",
    "number",
    "optional",
    "regex",
    "seconds",
    "signal_number",
    "size",
    "socket_path",
    "split_tcp",
    "text",
    "watcher_timeouts",
    "writable_dir",
)

T = TypeVar("T")

# SO_RCVBUF takes a C int: a larger value would raise OverflowError at bind time.
_MAX_RCVBUF = 2**31 - 1
_SIZE = re.compile(r"(\d+)([KMG]?)", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_PLACEHOLDERS = frozenset({"pid", "watcher"})


def number(expected: str, ok: Callable[[float], bool]) -> Callable[[str], float]:
    """A parser of finite floats for which ``ok`` holds."""

    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(expected) from None
        if not (math.isfinite(value) and ok(value)):
            raise ValueError(expected)
        return value

    return parse


_positive = number("a number of seconds > 0", lambda v: v > 0)


def seconds(raw: str) -> float:
    """Finite positive seconds, such as ``5`` or ``0.25``."""
    return _positive(raw)


def integer(expected: str, low: int, high: int | None = None) -> Callable[[str], int]:
    """A parser of integers from ``low`` to ``high`` (no upper bound if None)."""

    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(expected) from None
        if value < low or (high is not None and value > high):
            raise ValueError(expected)
        return value

    return parse


def optional(
    parse: Callable[[str], T], off: tuple[str, ...] = ("",)
) -> Callable[[str], T | None]:
    """``parse``, except that the strings in ``off`` mean None (not set)."""
    return lambda raw: None if raw in off else parse(raw)


def regex(raw: str) -> re.Pattern[str]:
    """A regular expression, compiled."""
    try:
        return re.compile(raw)
    except re.error as exc:
        raise ValueError(f"a regular expression ({exc})") from None


def msg_regex(raw: str) -> re.Pattern[str]:
    """A heartbeat format: a regular expression with a named group ``pid``."""
    pattern = regex(raw)
    if "pid" not in pattern.groupindex:
        raise ValueError("a regular expression with a named group (?P<pid>...)")
    return pattern


def ip(raw: str) -> str:
    """An IP address, or a host name resolved once (IPv4 first) to one."""
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:
        pass
    # As the original's bind() accepted: IPv4 first like its AF_INET socket,
    # so the engine binds an address literal.
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            return str(socket.getaddrinfo(raw, None, family)[0][4][0])
        except (OSError, UnicodeError):
            continue
    raise ValueError("an IP address such as 127.0.0.1 or ::1, or a host name")


def ip_literal(raw: str) -> str:
    """An IP address written as one (no host name)."""
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:
        raise ValueError("an IP address such as 127.0.0.1, 0.0.0.0 or ::1") from None


def choice(*choices: str) -> Callable[[str], str]:
    """A parser of one of ``choices``, in any case."""

    def parse(raw: str) -> str:
        if raw.lower() not in choices:
            raise ValueError("one of " + ", ".join(choices))
        return raw.lower()

    return parse


def command(raw: str) -> tuple[str, ...]:
    """A command line split like a shell would, placeholders {pid} and {watcher}."""
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


def writable_dir(raw: str) -> str:
    """A writable directory, created if missing (the surest test that it can be)."""
    path = os.path.abspath(raw)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ValueError(f"a writable directory ({exc.strerror})") from None
    return path


def signal_number(raw: str) -> int:
    """A signal name or number, as circus takes them."""
    try:
        signum = int(to_signum(raw))
    except (ValueError, AttributeError):  # to_signum lets AttributeError out
        signum = 0
    # 0 would make circusd's kill a no-op; an unknown number fails only at kill time.
    if signum not in signal.valid_signals():
        raise ValueError("a signal name or number such as TERM, SIGKILL or 9")
    return signum


def log_level(raw: str) -> str:
    """One of circus's log level names, lower case."""
    if raw.lower() not in LOG_LEVELS:
        raise ValueError("one of " + ", ".join(sorted(LOG_LEVELS)))
    return raw.lower()


def text(raw: str) -> str:
    """Any non-empty text."""
    if not raw:
        raise ValueError("a non-empty value")
    return raw


def split_tcp(address: str) -> tuple[str, str]:
    """``HOST:PORT`` or ``[IPV6]:PORT`` (a tcp endpoint after ``tcp://``) as
    (host, port text); either is empty when missing."""
    host, _, port = address.rpartition(":")
    return (host[1:-1] if host.startswith("[") and host.endswith("]") else host), port


def endpoint(raw: str) -> str:
    """A ZeroMQ endpoint circusd can be reached at."""
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


def size(raw: str) -> int:
    """A size in bytes, with an optional K, M or G (powers of 1024) suffix."""
    expected = "a size in bytes > 0, optionally with a K, M or G suffix, below 2G"
    match = _SIZE.fullmatch(raw)
    if match is None:
        raise ValueError(expected)
    value = int(match[1]) * _SIZE_UNITS[match[2].upper()]
    if not 0 < value <= _MAX_RCVBUF:
        raise ValueError(expected)
    return value


def socket_path(raw: str) -> str:
    """An absolute Unix socket path, or ``@NAME`` in the abstract namespace."""
    # Absolute: a plugin's working directory is circusd's, easy to get wrong.
    if not (raw.startswith("/") or (raw.startswith("@") and len(raw) > 1)):
        raise ValueError("an absolute path, or @NAME for the abstract namespace")
    return raw


def watcher_timeouts(raw: str) -> tuple[tuple[re.Pattern[str], float], ...]:
    """Comma-separated ``REGEX=SECONDS`` pairs, compiled, in their order."""
    expected = "comma-separated REGEX=SECONDS pairs with SECONDS > 0"
    pairs = []
    for item in filter(None, (part.strip() for part in raw.split(","))):
        pattern, sep, value = item.rpartition("=")
        if not (sep and pattern):
            raise ValueError(expected)
        try:
            timeout = seconds(value)
        except ValueError:
            raise ValueError(expected) from None
        pairs.append((regex(pattern), timeout))
    return tuple(pairs)


def boolean(raw: str) -> bool:
    """A boolean as circus takes them."""
    try:
        return bool(to_bool(raw))
    except ValueError:
        raise ValueError("a boolean: true/false, yes/no, on/off or 1/0") from None
