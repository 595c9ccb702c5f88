"""What a window costs and loses: a process's CPU, a socket's queue and drops."""

from __future__ import annotations

import time
from pathlib import Path

import psutil

DRAIN_POLL = 0.001  # seconds between looks at a socket's queue
DRAIN_LIMIT = 30.0  # seconds a receiver may take to read what is queued


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid``, all its threads (Linux
    /proc/PID/stat sums every thread, those that ended included)."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def run_seconds(pid: int) -> float:
    """Seconds every live thread of ``pid`` ran on a CPU, from the scheduler's
    own clock (``/proc/PID/task/TID/schedstat``, nanoseconds).  Unlike
    `cpu_seconds` it is not sampled at the timer tick: with tick-based
    accounting a reader woken by a timer is charged whole ticks it did not use."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except OSError:  # a thread that just ended
            continue
    return total / 1e9


def wakeups(pid: int) -> int:
    """Context switches of every live thread of ``pid`` (voluntary and not):
    how many times it was put to sleep or preempted, that is, woken again."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "status").read_text()
        except OSError:  # a thread that just ended
            continue
        for line in text.splitlines():
            if "ctxt_switches:" in line:
                total += int(line.split()[1])
    return total


def udp_socket_stats(port: int) -> tuple[int, int]:
    """(rx_queue bytes, drops) of the 127.0.0.1:port UDP socket, /proc/net/udp;
    (0, 0) if there is none."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/udp") as f:
        next(f)
        for line in f:
            cols = line.split()
            if cols[1] == want:
                return int(cols[4].split(":")[1], 16), int(cols[-1])
    return 0, 0


def rcvbuf_errors() -> int:
    """/proc/net/snmp Udp RcvbufErrors: datagrams dropped on full sockets,
    host-wide (other tenants' sockets count too)."""
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines()]
    udp = [cols for cols in lines if cols[0] == "Udp:"]
    return int(udp[1][udp[0].index("RcvbufErrors")])


def wait_drained(port: int, limit: float = DRAIN_LIMIT) -> float:
    """Wait until the socket on ``port`` has nothing queued; the monotonic time
    it was first seen empty. TimeoutError after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    for _ in range(int(limit / DRAIN_POLL) + 2):
        now = time.monotonic()
        if udp_socket_stats(port)[0] == 0:
            return now
        if now > deadline:
            break
        time.sleep(DRAIN_POLL)
    raise TimeoutError(f"port {port}: still queued after {limit:g} s")
