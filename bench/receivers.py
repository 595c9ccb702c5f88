"""The receivers of bench/e2e.py, one process each, driven over stdin/stdout.

``python bench/receivers.py --kind original|py|c|floor [options]`` binds a UDP
socket on 127.0.0.1 (a free port, SO_RCVBUF as asked, SO_RXQ_OVFL on), makes
the same pids known, prints one JSON line ``{"ready": ...}`` and then obeys one
command per stdin line, answering each with one JSON line on stdout:

- ``start``: zero the counters and start reading (a window at a fixed rate);
- ``stop``: read what is still queued, then report the window;
- ``pause``: stop reading, so that a backlog can be queued;
- ``drain N``: start reading and report once N datagrams were read (capacity);
- ``quit``.

What each kind runs on a readable socket:

- ``original``: circus.plugins.watchdog.WatchDog's own receive path on its own
  tornado IOLoop: its ``_bind_socket`` registers ``receive_udp_socket`` (one
  ``recvfrom``, decode, regex, ``pid_status`` update per wake-up); its pids are
  in ``pid_status`` as its ``handle_recv`` puts them there.
- ``c`` and ``py``: circus_watchdog's engine, ``Watchdog._on_readable`` on
  uvloop (``table.drain`` with the configured budget, then the metrics), on a
  socket from ``Watchdog._bind``; the circusd clients and the tick are not
  started.  ``py`` is the same code with ``CIRCUS_WATCHDOG_NO_EXTENSIONS=1``.
- ``floor``: bench/floor.c's count-only ``recvmmsg`` drain, called through
  ctypes from the same uvloop ``add_reader`` with the same budget, so that it
  differs from ``c`` only in what is done per datagram.

The handlers run as they are: ``c`` and ``py`` call the engine's
``_on_readable`` itself (it counts in the engine's metrics), ``floor`` adds up
what ``floor_drain`` returns, and the original's handler is wrapped in one
function call and one counter increment (about 0.04 us per datagram, under 1%
of its cost) as it counts nothing.  A timer every SAMPLE seconds (DRAIN_SAMPLE
while draining a backlog) notes when the count moves: the first and last
moves bound the time over which heartbeats were processed.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import fcntl
import json
import logging
import os
import resource
import socket
import sys
import termios
import time
from collections.abc import Callable
from typing import Any

KINDS = ("original", "py", "c", "floor")
SO_RXQ_OVFL = getattr(socket, "SO_RXQ_OVFL", 40)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
WATCHER = "bench"
SAMPLE = 0.01  # seconds between looks at the counters during a window
DRAIN_SAMPLE = 0.001  # the same while draining a backlog (shorter runs)
STOP_POLL = 0.01  # seconds between checks that the queue is empty after `stop`
STOP_LIMIT = 30.0  # seconds `stop` may spend reading what is queued
LOOP_RATE = 3600  # seconds: nothing expires during a run
BIND_ATTEMPTS = 5


def cpu_seconds() -> float:
    """User plus system CPU seconds of this process, all threads."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def udp_socket_stats(port: int) -> tuple[int, int]:
    """(rx_queue bytes, drops) of the 127.0.0.1:port UDP socket, /proc/net/udp."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/udp") as f:
        next(f)
        for line in f:
            cols = line.split()
            if cols[1] == want:
                return int(cols[4].split(":")[1], 16), int(cols[-1])
    return 0, 0


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def set_rcvbuf(sock: socket.socket, want: int) -> int:
    """SO_RCVBUF, then SO_RCVBUFFORCE past rmem_max (root); the bytes granted."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, want)
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2 < want:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, want)
        except PermissionError:
            pass
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2


class Receiver:
    """Counters and the command protocol; a subclass binds and reads."""

    kind = ""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.pids = range(args.pid_base, args.pid_base + args.pids)
        self.loop: asyncio.AbstractEventLoop
        self.sock: socket.socket
        self.port = 0
        self.reading = False
        self.target = 0  # `drain N`: report when this many datagrams were read
        self.first = self.last = 0.0  # monotonic time the count first/last moved
        self._seen = 0  # the datagram count at the last sample
        self._sampler: asyncio.TimerHandle | None = None
        self._base: dict[str, Any] = {}
        self._control = b""

    # -- what a kind provides ------------------------------------------------

    def counts(self) -> tuple[int, int, int, int]:
        """(datagrams, heartbeats, unknown, malformed) since the process began."""
        raise NotImplementedError

    def rxq_ovfl(self) -> int | None:
        """Drops the socket reported through SO_RXQ_OVFL, if this kind reads them."""
        return None

    def resume(self) -> None:
        raise NotImplementedError

    def pause(self) -> None:
        raise NotImplementedError

    def run_loop(self) -> None:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {}

    # -- shared --------------------------------------------------------------

    def sample(self, period: float) -> None:
        """Note whether the count moved; finish a backlog drain once complete."""
        t = time.monotonic()
        seen = self.counts()[0]
        if seen != self._seen:
            self._seen = seen
            if not self.first:
                self.first = t
            self.last = t
        if self.target and seen >= self.target:
            self.target = 0
            self.pause()
            self.reply(self.report(done=t))
            return
        self._sampler = self.loop.call_later(period, self.sample, period)

    def start_sampling(self, period: float) -> None:
        self.stop_sampling()
        self._sampler = self.loop.call_later(period, self.sample, period)

    def stop_sampling(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            self._sampler = None

    def snapshot(self) -> dict[str, Any]:
        datagrams, heartbeats, unknown, malformed = self.counts()
        queued, drops = udp_socket_stats(self.port)
        return {
            "datagrams": datagrams,
            "heartbeats": heartbeats,
            "unknown": unknown,
            "malformed": malformed,
            "cpu": cpu_seconds(),
            "drops": drops,
            "rxq_ovfl": self.rxq_ovfl(),
            "queued": queued,
            "t": time.monotonic(),
        }

    def begin(self) -> None:
        self.first = self.last = 0.0
        self._base = self.snapshot()
        self._seen = self._base["datagrams"]

    def report(self, done: float | None = None) -> dict[str, Any]:
        now = self.snapshot()
        base = self._base
        out: dict[str, Any] = {
            key: now[key] - base[key]
            for key in ("datagrams", "heartbeats", "unknown", "malformed", "drops")
        }
        out["cpu"] = round(now["cpu"] - base["cpu"], 6)
        ovfl = now["rxq_ovfl"]
        out["rxq_ovfl"] = None if ovfl is None else ovfl - (base["rxq_ovfl"] or 0)
        out["queued_bytes"] = now["queued"]
        out["first"] = self.first
        out["last"] = self.last
        out["t0"] = base["t"]
        out["done"] = done if done is not None else now["t"]
        return out

    def reply(self, obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    def on_control(self) -> None:
        data = os.read(0, 4096)
        if not data:  # the driver went away
            self.stop_loop()
            return
        self._control += data
        while b"\n" in self._control:
            line, self._control = self._control.split(b"\n", 1)
            self.command(line.decode().split())

    def command(self, words: list[str]) -> None:
        if not words:
            return
        cmd = words[0]
        if cmd == "start":
            self.begin()
            self.resume()
            self.start_sampling(SAMPLE)
            self.reply({"ok": "start"})
        elif cmd == "stop":
            self.finish_window(time.monotonic() + STOP_LIMIT)
        elif cmd == "pause":
            self.pause()
            self.reply({"ok": "pause"})
        elif cmd == "drain":
            self.begin()
            self.target = self._base["datagrams"] + int(words[1])
            self.resume()
            self.start_sampling(DRAIN_SAMPLE)
        elif cmd == "quit":
            self.stop_sampling()
            self.pause()
            self.stop_loop()
        else:
            self.reply({"error": f"unknown command {cmd!r}"})

    def finish_window(self, limit: float) -> None:
        # After the sender stopped: read on until nothing is queued (FIONREAD
        # is the size of the next datagram, 0 when none), then report.
        pending = fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        if int.from_bytes(pending, sys.byteorder) and time.monotonic() < limit:
            self.loop.call_later(STOP_POLL, self.finish_window, limit)
            return
        self.sample(SAMPLE)  # a last look, then no more
        self.stop_sampling()
        self.pause()
        self.reply(self.report(done=self.last or None))

    def stop_loop(self) -> None:
        self.loop.stop()

    def main(self) -> None:
        self.loop.add_reader(0, self.on_control)
        self.reply(
            {
                "ready": self.kind,
                "port": self.port,
                "pid": os.getpid(),
                "rcvbuf": self.granted,
                "cpus": sorted(os.sched_getaffinity(0)),
                **self.info(),
            }
        )
        self.run_loop()

    granted = 0


class OriginalReceiver(Receiver):
    """circus.plugins.watchdog.WatchDog's receive path on its tornado IOLoop."""

    kind = "original"

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        from circus import logger as circus_logger
        from circus.plugins.watchdog import WatchDog
        from tornado.ioloop import IOLoop

        # As circus runs it at its default log level: the per-datagram debug
        # call is a level check.  Only known pids are sent, so its warning for
        # unknown pids never fires either way.
        circus_logger.setLevel(logging.WARNING)
        self._read_event = IOLoop.READ
        wd = self.wd = WatchDog(
            "tcp://127.0.0.1:1",
            "tcp://127.0.0.1:2",
            1.0,
            None,
            port=0,
            ip="127.0.0.1",
            loop_rate=LOOP_RATE,
        )
        wd.starting = False
        now = time.time()
        for pid in self.pids:  # what handle_recv does on a `spawn` event
            wd.pid_status[str(pid)] = dict(watcher=WATCHER, last_activity=now)
        self.datagrams = 0
        receive = wd.receive_udp_socket

        def counted(fd: int, events: int) -> None:
            receive(fd, events)
            self.datagrams += 1

        self._handler = counted
        wd.receive_udp_socket = counted  # _bind_socket registers this attribute
        wd._bind_socket()
        if wd.sock is None:
            raise SystemExit("the original WatchDog could not bind")
        self.sock = wd.sock
        self.granted = set_rcvbuf(self.sock, args.rcvbuf)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
        self.port = self.sock.getsockname()[1]
        self.reading = True
        self.loop = wd.loop.asyncio_loop
        self.pause()

    def counts(self) -> tuple[int, int, int, int]:
        # Every datagram sent is a heartbeat of a known pid.
        return self.datagrams, self.datagrams, 0, 0

    def resume(self) -> None:
        if not self.reading:
            self.wd.loop.add_handler(
                self.sock.fileno(), self._handler, self._read_event
            )
            self.reading = True

    def pause(self) -> None:
        if self.reading:
            self.wd.loop.remove_handler(self.sock.fileno())
            self.reading = False

    def run_loop(self) -> None:
        self.wd.loop.start()

    def stop_loop(self) -> None:
        self.wd.loop.stop()

    def info(self) -> dict[str, Any]:
        return {"loop": type(self.loop).__module__}


class EngineReceiver(Receiver):
    """circus_watchdog's ``Watchdog._on_readable`` on uvloop, no circusd clients."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        import uvloop

        import circus_watchdog
        from circus_watchdog.config import Config
        from circus_watchdog.engine import Watchdog

        self.kind = "c" if circus_watchdog.compiled else "py"
        if self.kind != args.kind:
            raise SystemExit(
                f"asked for the {args.kind} core, circus_watchdog.compiled is "
                f"{circus_watchdog.compiled} (CIRCUS_WATCHDOG_NO_EXTENSIONS="
                f"{os.environ.get('CIRCUS_WATCHDOG_NO_EXTENSIONS', '')!r})"
            )
        self.loop = uvloop.new_event_loop()
        asyncio.set_event_loop(self.loop)
        for attempt in range(BIND_ATTEMPTS):
            # The engine wants a port number: take one that was free a moment
            # ago, and another if someone took it meanwhile.
            config = Config.from_options(
                {
                    "ip": "127.0.0.1",
                    "port": str(free_udp_port()),
                    "loop_rate": str(LOOP_RATE),
                    "rcvbuf": str(args.rcvbuf),
                    "budget": str(args.budget),
                }
            )
            wd = self.wd = Watchdog(config)
            try:
                self.sock = wd._sock = wd._bind()  # the engine's socket and sizing
                break
            except OSError:
                if attempt == BIND_ATTEMPTS - 1:
                    raise
        self.engine_granted = (
            self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2
        )
        # The engine looks for socket.SO_RCVBUFFORCE, which Python does not
        # define, so it never goes past net.core.rmem_max: force the same
        # buffer as the other receivers get (the engine's figure is reported).
        self.granted = set_rcvbuf(self.sock, args.rcvbuf)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
        self.port = self.sock.getsockname()[1]
        now = time.monotonic()
        for pid in self.pids:  # what a spawn event or a `list` does
            wd.table.add(pid, WATCHER, now)
        self._handler = wd._on_readable  # the engine's receive path, as it is

    def counts(self) -> tuple[int, int, int, int]:
        m = self.wd.metrics
        return m.datagrams, m.heartbeats, m.unknown, m.malformed

    def rxq_ovfl(self) -> int | None:
        return int(self.wd.table.kernel_drops)

    def resume(self) -> None:
        if not self.reading:
            self.loop.add_reader(self.sock.fileno(), self._handler)
            self.reading = True

    def pause(self) -> None:
        if self.reading:
            self.loop.remove_reader(self.sock.fileno())
            self.reading = False

    def run_loop(self) -> None:
        self.loop.run_forever()

    def info(self) -> dict[str, Any]:
        from circus_watchdog.engine import describe

        return {
            "loop": type(self.loop).__module__,
            "describe": describe(),
            "engine_rcvbuf": self.engine_granted,
        }


class FloorReceiver(EngineReceiver):
    """bench/floor.c's count-only recvmmsg drain on the same uvloop reader."""

    def __init__(self, args: argparse.Namespace) -> None:
        Receiver.__init__(self, args)
        import uvloop

        self.kind = "floor"
        lib = ctypes.CDLL(args.floor_lib)
        lib.floor_drain.argtypes = [ctypes.c_int, ctypes.c_long]
        lib.floor_drain.restype = ctypes.c_long
        self.loop = uvloop.new_event_loop()
        asyncio.set_event_loop(self.loop)
        sock = self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.granted = set_rcvbuf(sock, args.rcvbuf)
        sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self.datagrams = 0
        drain: Callable[[int, int], int] = lib.floor_drain
        fd, budget = sock.fileno(), args.budget

        def handler() -> None:
            n = drain(fd, budget)
            if n < 0:
                raise OSError(-n, os.strerror(-n))
            self.datagrams += n

        self._handler = handler

    def counts(self) -> tuple[int, int, int, int]:
        # Count-only: it never looks at what it read.
        return self.datagrams, self.datagrams, 0, 0

    def rxq_ovfl(self) -> int | None:
        return None

    def info(self) -> dict[str, Any]:
        return {"loop": type(self.loop).__module__}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", choices=KINDS, required=True)
    p.add_argument("--pids", type=int, default=1000, help="known pids (count)")
    p.add_argument("--pid-base", type=int, default=1000, help="first known pid")
    p.add_argument("--rcvbuf", type=int, default=8 << 20, help="SO_RCVBUF (bytes)")
    p.add_argument("--budget", type=int, default=4096, help="datagrams per wake-up")
    p.add_argument("--floor-lib", help="floor.so built from bench/floor.c")
    p.add_argument("--cpu", type=int, default=None, help="pin to this CPU")
    args = p.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    cls = {"original": OriginalReceiver, "floor": FloorReceiver}.get(
        args.kind, EngineReceiver
    )
    cls(args).main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
