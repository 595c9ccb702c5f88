"""circus 0.19's ``WatchDog`` receive path, as a receiver process of its own.

``python bench/e2e/original.py --rcvbuf BYTES --pids 1,2,3 [--port N]`` builds
a ``circus.plugins.watchdog.WatchDog`` (port N, default 0: any free loopback
port), puts the pids in its ``pid_status`` as its ``handle_recv`` does on a
``spawn`` event, binds with its own ``_bind_socket`` (which registers
``receive_udp_socket`` on its tornado IOLoop: one ``recvfrom``, decode, regex
and ``pid_status`` update per wake-up), sizes the buffer as the daemon does
(``circus_watchdog.sockets.set_rcvbuf``), prints ``ready PORT GRANTED`` and
runs the loop. On SIGTERM it prints ``count N``
(datagrams read) and exits: the same protocol as the C floors.

The handler runs as it is, wrapped in one call and one increment (it counts
nothing itself). circus logs at its default level (WARNING): the per-datagram
debug call is a level check, and every pid sent is known.
"""

from __future__ import annotations

import argparse
import logging
import signal
import time
from typing import Any

from circus_watchdog.sockets import set_rcvbuf

LOOP_RATE = 3600  # seconds: look_after never runs during a benchmark


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rcvbuf", type=int, required=True, help="SO_RCVBUF (bytes)")
    p.add_argument("--pids", required=True, help="known pids, comma-separated")
    p.add_argument("--port", type=int, default=0, help="UDP port (0: any free)")
    args = p.parse_args()

    from circus import logger as circus_logger
    from circus.plugins.watchdog import WatchDog

    circus_logger.setLevel(logging.WARNING)
    wd = WatchDog(
        "tcp://127.0.0.1:1",  # never connected: only the receive path runs
        "tcp://127.0.0.1:2",
        1.0,
        None,
        port=args.port,
        ip="127.0.0.1",
        loop_rate=LOOP_RATE,
    )
    wd.starting = False
    now = time.time()
    for pid in args.pids.split(","):
        wd.pid_status[pid] = dict(watcher="fleet", last_activity=now)
    count = 0
    receive = wd.receive_udp_socket

    def counted(fd: int, events: int) -> None:
        nonlocal count
        receive(fd, events)
        count += 1

    wd.receive_udp_socket = counted  # _bind_socket registers this attribute
    wd._bind_socket()
    if wd.sock is None:
        raise SystemExit("the original WatchDog could not bind")
    granted = set_rcvbuf(wd.sock, args.rcvbuf)

    def stop(*_: Any) -> None:
        wd.loop.add_callback_from_signal(wd.loop.stop)

    signal.signal(signal.SIGTERM, stop)
    print(f"ready {wd.sock.getsockname()[1]} {granted}", flush=True)
    wd.loop.start()
    print(f"count {count}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
