"""A process for the demo and the tests: heartbeats, then perhaps hangs.

``python -m circus_watchdog.demo_worker --address 127.0.0.1:1664
--interval 0.5 [--hang-after 5:20] [--silent] [--hang-file PATH]
[--format TEMPLATE]``

It sends a heartbeat every ``--interval`` seconds; with ``--hang-after A:B``
it stops sending after a random time between A and B seconds but stays alive,
like a process stuck in a deadlock; ``--silent`` never sends.  When it hangs,
``--hang-file`` gets a line ``PID LAST`` appended, LAST being the
``time.time()`` of its last heartbeat (of its start if it sent none), so a test
can measure kill latency.  ``--format`` sets the heartbeat text for a custom
``msg_regex``, with ``{pid}`` and ``{timestamp}`` fields (default:
``PID;TIMESTAMP``).  It exits when its parent (circusd) is gone, and after
``--lifetime`` seconds in any case.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import time

from .client import format_heartbeat, parse_address


def _payload(template: str | None) -> bytes:
    if template is None:
        return format_heartbeat()
    return template.format(pid=os.getpid(), timestamp=f"{time.time():.3f}").encode()


def main(argv: list[str] | None = None) -> int:
    """Run the worker; returns the exit code."""
    parser = argparse.ArgumentParser(prog="circus_watchdog.demo_worker")
    parser.add_argument("--address", default="127.0.0.1:1664", help="HOST:PORT")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds")
    parser.add_argument("--hang-after", help="A:B seconds, then stop sending")
    parser.add_argument("--silent", action="store_true", help="never send")
    parser.add_argument("--lifetime", type=float, default=3600, help="seconds")
    parser.add_argument(
        "--hang-file", help="append 'PID LAST_HEARTBEAT_TIME' here on hanging"
    )
    parser.add_argument(
        "--format",
        dest="template",
        help="heartbeat text with {pid} and {timestamp} (default: PID;TIMESTAMP)",
    )
    args = parser.parse_args(argv)
    host, port = parse_address(args.address, "--address")
    if args.template is not None:
        _payload(args.template)  # a bad template fails now, not at the first beat
    hang_at = float("inf")
    if args.hang_after:
        low, _, high = args.hang_after.partition(":")
        hang_at = time.monotonic() + random.uniform(float(low), float(high or low))
    parent = os.getppid()
    end = time.monotonic() + args.lifetime
    last_sent = time.time()
    hung = False
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        while time.monotonic() < end and os.getppid() == parent:
            if args.silent:
                pass
            elif time.monotonic() < hang_at:
                try:
                    sock.sendto(_payload(args.template), (host, port))
                    last_sent = time.time()
                except OSError:
                    pass  # nobody listening yet: keep trying
            elif not hung:
                hung = True
                if args.hang_file:
                    with open(args.hang_file, "a") as out:
                        out.write(f"{os.getpid()} {last_sent:.6f}\n")
            time.sleep(args.interval)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
