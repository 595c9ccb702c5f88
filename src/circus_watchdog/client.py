"""Heartbeat sender for processes that circus-watchdog monitors.

Stdlib only and free of package-relative imports, so a monitored program can
vendor this single file.  Nothing here raises ``OSError`` into the host
process: a failed send is counted and the next one is tried on schedule.
Bad configuration (an interval, an address) raises ``ValueError`` up front.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

__all__ = (
    "ADDRESS_ENV",
    "DEFAULT_ADDRESS",
    "HeartbeatThread",
    "format_heartbeat",
    "get_address",
    "heartbeat_task",
    "main",
    "parse_address",
    "send_heartbeat",
    "start_heartbeat_task",
)

DEFAULT_ADDRESS = ("127.0.0.1", 1664)
ADDRESS_ENV = "CIRCUS_WATCHDOG_ADDRESS"
# pid_t is a signed 32-bit int on Linux and macOS.  A copy of
# circus_watchdog.pids.PID_MAX (this file imports nothing of the package, so it
# can be vendored; tests/test_client.py checks the two agree).
PID_MAX = 2**31 - 1

Address = tuple[str, int]
# (family, sockaddr) from getaddrinfo; sockaddr is 2-tuple (v4) or 4-tuple (v6).
_Resolved = tuple[int, tuple[Any, ...]]
_T = TypeVar("_T")


def parse_address(text: str, name: str = "address") -> Address:
    """Parse ``HOST:PORT`` or ``[IPV6]:PORT``; errors name ``name``."""
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        bad_host = not host
    else:
        bad_host = not host or ":" in host  # a bare IPv6 address needs brackets
    port = int(port_text) if port_text.isascii() and port_text.isdigit() else 0
    if not sep or bad_host or not 1 <= port <= 65535 or host.strip() != host:
        raise ValueError(
            f"{name}: expected HOST:PORT or [IPV6]:PORT with a port in 1..65535, "
            f"got {text!r}"
        )
    return host, port


def get_address(address: Address | str | None = None) -> Address:
    """Pick the address: the argument, else $CIRCUS_WATCHDOG_ADDRESS, else default."""
    if isinstance(address, str):
        return parse_address(address)
    if address is not None:
        host, port = address
        # getaddrinfo would silently wrap port 70000 to 4464.
        if not (isinstance(host, str) and host and type(port) is int) or not (
            1 <= port <= 65535
        ):
            raise ValueError(
                "address: expected (host, port) with a port in 1..65535, "
                f"got {address!r}"
            )
        return host, port
    text = os.environ.get(ADDRESS_ENV)
    if text:  # unset or empty: the default
        return parse_address(text, ADDRESS_ENV)
    return DEFAULT_ADDRESS


def format_heartbeat(pid: int | None = None, timestamp: float | None = None) -> bytes:
    """Return the ``PID;TIMESTAMP`` datagram (defaults: this pid, time.time())."""
    if pid is None:
        pid = os.getpid()
    elif not 1 <= pid <= PID_MAX:
        raise ValueError(f"pid must be in 1..{PID_MAX}, got {pid!r}")
    if timestamp is None:
        timestamp = time.time()
    return b"%d;%.3f" % (pid, timestamp)


def _check_interval(interval: float) -> float:
    interval = float(interval)
    if not (math.isfinite(interval) and interval > 0):
        raise ValueError(f"interval must be > 0 seconds, got {interval!r}")
    return interval


class _Pacer:
    """When the next beat is due: every ``interval`` seconds on ``clock``;
    after a stall it skips the missed beats instead of sending a burst."""

    def __init__(self, interval: float, clock: Callable[[], float]) -> None:
        self._interval = interval
        self._clock = clock
        self._next = clock()

    def wait(self) -> float:
        """Seconds to wait before the next beat."""
        self._next += self._interval
        now = self._clock()
        if self._next < now:
            self._next = now
        return self._next - now


def _resolve(host: str, port: int, flags: int = 0) -> _Resolved:
    info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM, flags=flags)[0]
    return info[0], info[4]


class _Sender:
    """One UDP socket, opened on first use; counts sends and swallowed errors."""

    def __init__(self, address: Address) -> None:
        self.address = address
        self.resolved: _Resolved | None = None
        self.sock: socket.socket | None = None
        self.sent = 0
        self.errors = 0

    def send(self, pid: int | None = None) -> bool:
        data = format_heartbeat(pid)  # outside the try: a bad pid is a caller bug
        try:
            if self.resolved is None:
                self.resolved = _resolve(*self.address)
            if self.sock is None:
                sock = socket.socket(self.resolved[0], socket.SOCK_DGRAM)
                sock.setblocking(False)  # never stall a thread, a loop, stop()
                self.sock = sock
            # Unconnected UDP: no ECONNREFUSED from an earlier ICMP on Linux;
            # a full buffer (EAGAIN) or anything else just loses this beat.
            self.sock.sendto(data, self.resolved[1])
        except OSError:
            self.errors += 1
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def send_heartbeat(
    address: Address | str | None = None, pid: int | None = None
) -> bool:
    """Send one heartbeat; return False instead of raising if the send failed."""
    sender = _Sender(get_address(address))
    try:
        return sender.send(pid)
    finally:
        sender.close()


class HeartbeatThread(threading.Thread):
    """Daemon thread sending a heartbeat every ``interval`` seconds until stop().

    The pid is read at each send.  A thread does not survive ``fork()``: a
    forked child that is monitored starts its own.
    """

    def __init__(
        self,
        interval: float = 1.0,
        address: Address | str | None = None,
        *,
        name: str = "circus-watchdog-heartbeat",
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.interval = _check_interval(interval)
        self.address = get_address(address)
        self._sender = _Sender(self.address)
        self._stopping = threading.Event()

    @property
    def sent(self) -> int:
        """Heartbeats sent so far."""
        return self._sender.sent

    @property
    def errors(self) -> int:
        """Sends that failed with OSError (counted, then ignored)."""
        return self._sender.errors

    def run(self) -> None:
        """Send until stop() (called by start(), not by users)."""
        try:
            pacer = _Pacer(self.interval, time.monotonic)
            while not self._stopping.is_set():
                self._sender.send()
                self._stopping.wait(pacer.wait())
        finally:
            self._sender.close()

    def stop(self, timeout: float = 5.0) -> bool:
        """Ask the thread to stop and wait at most ``timeout`` s; True if it did."""
        self._stopping.set()
        if self.ident is None:  # never started
            return True
        self.join(timeout)
        return not self.is_alive()

    def __enter__(self) -> HeartbeatThread:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


async def _aresolve(loop: asyncio.AbstractEventLoop, host: str, port: int) -> _Resolved:
    try:  # a numeric host resolves without I/O: no executor thread needed
        return _resolve(host, port, socket.AI_NUMERICHOST)
    except socket.gaierror:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        return infos[0][0], infos[0][4]


async def heartbeat_task(
    interval: float = 1.0, address: Address | str | None = None
) -> None:
    """Send a heartbeat every ``interval`` seconds until cancelled."""
    interval = _check_interval(interval)
    address = get_address(address)
    loop = asyncio.get_running_loop()
    sender = _Sender(address)
    try:
        pacer = _Pacer(interval, loop.time)
        while True:
            if sender.resolved is None:
                try:
                    sender.resolved = await _aresolve(loop, *address)
                except OSError:
                    sender.errors += 1
            if sender.resolved is not None:
                sender.send()
            await asyncio.sleep(pacer.wait())
    finally:
        sender.close()


def start_heartbeat_task(
    interval: float = 1.0, address: Address | str | None = None
) -> asyncio.Task[None]:
    """Start heartbeat_task() on the running loop; bad arguments raise here."""
    interval = _check_interval(interval)
    address = get_address(address)
    return asyncio.get_running_loop().create_task(
        heartbeat_task(interval, address), name="circus-watchdog-heartbeat"
    )


def _alive(pid: int) -> bool:
    # A copy of circus_watchdog.procfs.alive (see PID_MAX): a zombie is gone.
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by another user
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS), or it vanished meanwhile: trust kill(0)


def _arg(convert: Callable[[str], _T], what: str) -> Callable[[str], _T]:
    # argparse hides a type function's ValueError text; say what was expected.
    def parse(text: str) -> _T:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what}, got {text!r}") from None
        return value

    return parse


def _positive_float(text: str) -> float:
    return _check_interval(float(text))


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError
    return value


def _pid(text: str) -> int:
    value = int(text)
    if not 1 <= value <= PID_MAX:
        raise ValueError
    return value


def main(argv: list[str] | None = None) -> int:
    """Command line sender: ``python -m circus_watchdog.client``."""
    parser = argparse.ArgumentParser(
        prog="python -m circus_watchdog.client",
        description="Send circus-watchdog heartbeats (PID;TIMESTAMP) over UDP.",
    )
    parser.add_argument(
        "--interval",
        type=_arg(_positive_float, "expected seconds > 0"),
        default=1.0,
        metavar="S",
        help="seconds between heartbeats (default: 1.0)",
    )
    parser.add_argument(
        "--address",
        type=_arg(lambda s: parse_address(s, "--address"), "expected HOST:PORT"),
        default=None,
        metavar="HOST:PORT",
        help=f"where to send ([IPV6]:PORT for IPv6; default: ${ADDRESS_ENV}, "
        "else 127.0.0.1:1664)",
    )
    parser.add_argument(
        "--count",
        type=_arg(_count, "expected an integer >= 1"),
        default=None,
        metavar="N",
        help="stop after N heartbeats (default: run until interrupted)",
    )
    parser.add_argument(
        "--pid",
        type=_arg(_pid, f"expected a pid in 1..{PID_MAX}"),
        default=None,
        help="pid to report, e.g. $$ in a shell wrapper; the sender exits once "
        "that process is gone (default: this process)",
    )
    args = parser.parse_args(argv)
    try:
        address = get_address(args.address)
    except ValueError as exc:
        parser.error(str(exc))
    sender = _Sender(address)
    try:
        pacer = _Pacer(args.interval, time.monotonic)
        while args.count is None or sender.sent + sender.errors < args.count:
            if args.pid is not None and not _alive(args.pid):
                break
            if not sender.send(args.pid) and sender.errors == 1:
                print(f"{parser.prog}: cannot send to {address}", file=sys.stderr)
            if sender.sent + sender.errors == args.count:
                break
            time.sleep(pacer.wait())
    except KeyboardInterrupt:
        return 130
    finally:
        sender.close()
    return 1 if sender.errors else 0


if __name__ == "__main__":
    sys.exit(main())
