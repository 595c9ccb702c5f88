"""A watcher process for tests/test_decisions_circusd.py: it heartbeats, and
goes silent in one of the ways the watchdog tells apart (asleep, spinning,
starved, stopped under a debugger).

``python decisions_worker.py --port PORT --ctl DIR --mode MODE
[--interval S] [--random-phase]``

Each heartbeat is the plain ``PID;TIMESTAMP`` datagram
(circus_watchdog.client.format_heartbeat) to 127.0.0.1:PORT, and is noted as
a line ``PID TIME`` (TIME = time.time() once sent) in DIR/beats, so a test
knows each pid's last heartbeat without asking the watchdog.  The test steers
a worker through the file DIR/PID (its own pid):

- ``healthy``: a heartbeat every ``--interval``; silent (asleep) while DIR/PID
  exists, and heartbeating again once it is removed, on its own schedule (as
  when a broken heartbeat path is mended: each resumes at its own phase).
- ``sleep``: once DIR/PID exists, hangs asleep.
- ``busy``: once DIR/PID exists, hangs in a busy loop at its normal priority.
- ``work``: in a loop, 0.1 s of CPU work and a heartbeat.  Runnable all the
  time, it beats only as fast as the CPU it is given (a cgroup CPU quota).
- ``starved``: the ``work`` loop; once DIR/starve exists, it gives itself the
  lowest priority: SCHED_IDLE and, where the kernel's autogroups are on, its
  session's autogroup at nice 19 (circusd starts each process in its own
  session, and sessions compete as groups, so the low priority alone would not
  starve it).  On a busy host it then gets almost no CPU.  It starts at the
  normal priority so that it beats before the test loads the host, whatever
  else runs there; the test gives it its priority back (`unstarve`).

``--random-phase`` waits a random part of ``--interval`` before the first
heartbeat.  Every mode exits when its parent (circusd) is gone, and after
``--lifetime`` seconds in any case.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import time
from pathlib import Path

from circus_watchdog.client import format_heartbeat

WORK = 0.1  # seconds of CPU between two heartbeats (starved, work)
AUTOGROUPS = Path("/proc/sys/kernel/sched_autogroup_enabled")


class Worker:
    def __init__(self, port: int, ctl: Path, lifetime: float) -> None:
        self.address = ("127.0.0.1", port)
        self.flag = ctl / str(os.getpid())
        self.starve = ctl / "starve"
        self.beats = ctl / "beats"
        self.parent = os.getppid()
        self.end = time.monotonic() + lifetime
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def alive(self) -> bool:
        """False once circusd is gone or the lifetime is over."""
        return os.getppid() == self.parent and time.monotonic() < self.end

    def beat(self) -> None:
        try:
            self.sock.sendto(format_heartbeat(), self.address)
        except OSError:
            return  # nobody listening yet
        with open(self.beats, "a") as out:
            out.write(f"{os.getpid()} {time.time():.6f}\n")

    def hang_asleep(self) -> None:
        while self.alive():
            time.sleep(0.2)

    def hang_busy(self) -> None:
        while self.alive():
            for _ in range(100_000):
                pass

    def heartbeats(self, interval: float, mode: str) -> None:
        while self.alive():
            if not self.flag.exists():
                self.beat()
            elif mode == "sleep":
                return self.hang_asleep()
            elif mode == "busy":
                return self.hang_busy()
            # healthy and flagged: this beat is lost, as on a broken heartbeat
            # path; the schedule, and so the phase, goes on.
            time.sleep(interval)
        return None

    def cpu_bound(self, mode: str) -> None:
        starved = False
        while self.alive():
            if mode == "starved" and not starved and self.starve.exists():
                starve()
                starved = True
            start = time.thread_time()
            while time.thread_time() - start < WORK:
                pass
            self.beat()


def starve() -> None:
    """The lowest priority a process can give itself (see the module doc)."""
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    set_autogroup_nice("self", 19)


def unstarve(pid: int) -> None:
    """Give ``pid`` (in mode ``starved``) its normal priority back."""
    os.sched_setscheduler(pid, os.SCHED_OTHER, os.sched_param(0))
    set_autogroup_nice(str(pid), 0)


def set_autogroup_nice(pid: str, nice: int) -> None:
    # sched(7): with autogroups on, CPU is shared between sessions first, and a
    # session's share follows the nice value written to /proc/PID/autogroup.
    if AUTOGROUPS.exists() and AUTOGROUPS.read_text().strip() == "1":
        Path(f"/proc/{pid}/autogroup").write_text(str(nice))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True, help="UDP port")
    parser.add_argument("--ctl", type=Path, required=True, help="control directory")
    parser.add_argument(
        "--mode",
        choices=["healthy", "sleep", "busy", "starved", "work"],
        default="healthy",
    )
    parser.add_argument("--interval", type=float, default=0.1, help="seconds")
    parser.add_argument("--random-phase", action="store_true")
    parser.add_argument("--lifetime", type=float, default=600, help="seconds")
    args = parser.parse_args()
    worker = Worker(args.port, args.ctl, args.lifetime)
    if args.mode in ("starved", "work"):
        worker.cpu_bound(args.mode)
        return
    if args.random_phase:
        time.sleep(random.uniform(0, args.interval))
    worker.heartbeats(args.interval, args.mode)


if __name__ == "__main__":
    main()
