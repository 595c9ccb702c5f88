"""The phases of a run: what is measured, in which order, and how.

Every phase runs its receivers side by side: within one repetition each
receiver gets the same window back to back, and the order rotates from one
repetition (and rate) to the next, so that no receiver always follows the same
one or always runs first.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

from .accounting import (
    cpu_seconds,
    rcvbuf_errors,
    run_seconds,
    udp_socket_stats,
    wait_drained,
    wakeups,
)
from .fleet import Daemon
from .receivers import Receiver, Run
from .sender import Sender, finish

Log = Callable[[str], None]
SETTLE = 0.05  # seconds after the queue is empty: the last batch is applied
FILL_LIMIT = 120.0  # seconds to queue a backlog
PROBE_INTERVAL = 0.25  # seconds between freshness probes
PROBE_POLLS = 50  # looks at /status per probe (every PROBE_POLL seconds)
PROBE_POLL = 0.02
FLOOD_LEAD = 1.0  # seconds of flood before the first probe


def rotated(items: Sequence[Receiver], k: int) -> list[Receiver]:
    """``items`` rotated left by ``k``."""
    k %= len(items)
    return [*items[k:], *items[:k]]


def _abort(run: Run) -> None:
    try:
        run.finish()
    except Exception:  # noqa: BLE001 - already failing; the first error wins
        pass


def window(rx: Receiver, sender: Sender, rate: str, seconds: float) -> dict[str, Any]:
    """One receiver, one flood at ``rate`` for ``seconds``: CPU, counts, drops."""
    # The socket counters are read outside the span from the receiver's count
    # at open() to its count in finish(), so that span is the CPU's: with
    # 20,000 sockets on the host one read of /proc/net/udp takes about half a
    # second, in which a fleet that never stops sending adds to the count.
    # A port with no socket yet reads as no drops, which a fresh socket has.
    drops0 = udp_socket_stats(rx.port)[1] if rx.port else 0
    snmp0 = rcvbuf_errors()
    run = rx.open()
    try:
        cpu0, wake0, ran0 = cpu_seconds(run.pid), wakeups(run.pid), run_seconds(run.pid)
        sent = sender.run(run.port, rate, duration=seconds)
        if sent["sent"] is not None:  # None: the fleet sends on, nothing drains
            wait_drained(run.port)
        time.sleep(SETTLE)
        drops1 = udp_socket_stats(run.port)[1]
        cpu1, wake1, ran1 = cpu_seconds(run.pid), wakeups(run.pid), run_seconds(run.pid)
    except BaseException:
        _abort(run)
        raise
    got = run.finish()
    snmp1 = rcvbuf_errors()
    cpu = cpu1 - cpu0
    hb = got.heartbeats
    return {
        "receiver": rx.kind,
        "offered": rate,
        "window": seconds,
        "sent": sent["sent"],
        "sent_rate": sent["rate"],
        "datagrams": got.datagrams,
        "heartbeats": hb,
        "loss": None if sent["sent"] is None else sent["sent"] - got.datagrams,
        "socket_drops": drops1 - drops0,
        "rcvbuf_errors": snmp1 - snmp0,
        "cpu": round(cpu, 4),
        "cpu_us_per_hb": round(cpu / hb * 1e6, 4) if hb else None,
        "processed_rate": round(hb / sent["elapsed"], 1) if sent["elapsed"] else None,
        "ran_us_per_hb": round((ran1 - ran0) / hb * 1e6, 4) if hb else None,
        "wakeups_per_s": round((wake1 - wake0) / sent["elapsed"], 1)
        if sent["elapsed"]
        else None,
    }


def _log_row(log: Log, tag: str, row: dict[str, Any]) -> None:
    cpu, sent, loss = row["cpu_us_per_hb"], "-", "-"
    if row["sent"] is not None:  # None: the fleet sent, nobody counted
        sent = f"{row['sent']:>9,} ({row['sent_rate']:>9,.0f}/s)"
        loss = f"{row['loss']:>8,}"
    log(
        f"{tag} {row['offered']:>7} {row['receiver']:>12}: sent {sent} counted "
        f"{row['datagrams']:>9,} loss {loss} drops {row['socket_drops']:>7,} cpu "
        f"{'-' if cpu is None else format(cpu, '.3f')} us/hb"
    )


def rates(
    receivers: Sequence[Receiver],
    sender: Sender,
    offered: Sequence[str],
    seconds: float,
    repeats: int,
    log: Log,
) -> list[dict[str, Any]]:
    """Every receiver at every rate, ``repeats`` times, interleaved and rotated."""
    rows = []
    for rep in range(repeats):
        for i, rate in enumerate(offered):
            for pos, rx in enumerate(rotated(receivers, rep + i)):
                row = window(rx, sender, rate, seconds)
                row.update(repeat=rep, position=pos)
                rows.append(row)
                _log_row(log, f"#{rep}", row)
    return rows


def backlog(
    receivers: Sequence[Receiver],
    sender: Sender,
    count: int,
    repeats: int,
    log: Log,
) -> list[dict[str, Any]]:
    """Capacity: fill a stopped (SIGSTOP) receiver's socket with ``count``
    heartbeats, resume it and time it until its queue is empty."""
    rows = []
    for rep in range(repeats):
        for pos, rx in enumerate(rotated(receivers, rep)):
            run = rx.open()
            try:
                row = _drain_backlog(run, sender, count)
            except BaseException:
                _abort(run)
                raise
            run.finish()
            row.update(receiver=rx.kind, repeat=rep, position=pos)
            rows.append(row)
            log(
                f"backlog #{rep} {rx.kind:>12}: {row['queued']:,} queued "
                f"(fill drops {row['fill_drops']:,}) drained in "
                f"{row['wall']:.3f} s = {row['capacity']:,.0f}/s, cpu "
                f"{row['cpu_us_per_hb']:.3f} us/hb"
            )
    return rows


def _drain_backlog(run: Run, sender: Sender, count: int) -> dict[str, Any]:
    os.kill(run.pid, signal.SIGSTOP)
    try:
        drops0 = udp_socket_stats(run.port)[1]
        sent = sender.run(run.port, "max", duration=FILL_LIMIT, count=count)
        queued_bytes, drops1 = udp_socket_stats(run.port)
        cpu0 = cpu_seconds(run.pid)
        t0 = time.monotonic()
    finally:
        os.kill(run.pid, signal.SIGCONT)
    empty = wait_drained(run.port)
    time.sleep(SETTLE)
    cpu = cpu_seconds(run.pid) - cpu0
    queued = sent["sent"] - (drops1 - drops0)
    wall = empty - t0
    return {
        "sent": sent["sent"],
        "fill_drops": drops1 - drops0,
        "queued": queued,
        "queued_bytes": queued_bytes,
        "wall": round(wall, 6),
        "capacity": round(queued / wall, 1) if wall > 0 else None,
        "cpu": round(cpu, 4),
        "cpu_us_per_hb": round(cpu / queued * 1e6, 4) if queued else None,
    }


# -- freshness -------------------------------------------------------------------


def probe_once(daemon: Daemon, pid: int) -> tuple[float, str]:
    """Send one heartbeat for ``pid``; the delay until the daemon applied it
    (its ``last_seen`` moved), in seconds, and how it was computed.

    /status gives each pid's ``age`` and the daemon's ``monotonic`` at the
    reply; CLOCK_MONOTONIC is one clock for every process on Linux, so the
    heartbeat was applied at ``monotonic - age``. Without ``monotonic`` the
    reply's arrival time stands in for it: an upper bound on the delay.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sent_at = time.monotonic()
        sock.sendto(b"%d;%.3f" % (pid, time.time()), ("127.0.0.1", daemon.port))
    for _ in range(PROBE_POLLS):
        time.sleep(PROBE_POLL)
        status = daemon.proc.status()
        got_at = time.monotonic()
        ages = {row["pid"]: row["age"] for row in status["pids"]}
        now = status.get("monotonic")
        applied = (got_at if now is None else now) - ages[pid]
        # The previous probe is PROBE_INTERVAL old: anything newer is this one.
        if applied > sent_at - PROBE_INTERVAL / 2:
            how = "reply-time upper bound" if now is None else "status monotonic"
            return applied - sent_at, how
    raise TimeoutError(f"the heartbeat of {pid} was not applied within 1 s")


def freshness(
    daemon: Daemon,
    probe: int,
    sender: Sender,
    flood_rate: str,
    tries: int,
    log: Log,
) -> dict[str, Any]:
    """Probe delays on an idle daemon, then under a flood of the fleet's pids."""
    out: dict[str, Any] = {"tries": tries, "flood_rate": flood_rate}
    for label in ("idle", "flood"):
        bg, seconds, started = None, 0.0, time.monotonic()
        if label == "flood":
            seconds = FLOOD_LEAD + tries * (PROBE_INTERVAL + 0.2) + 2
            bg = sender.start(daemon.port, flood_rate, duration=seconds)
            time.sleep(FLOOD_LEAD)
        delays, hows = [], set()
        try:
            for _ in range(tries):
                time.sleep(PROBE_INTERVAL)
                delay, how = probe_once(daemon, probe)
                delays.append(round(delay, 6))
                hows.add(how)
        except BaseException:
            if bg is not None:
                bg.kill()
                bg.wait()
            raise
        out[label] = {"delays": delays, "method": sorted(hows)}
        if bg is not None:
            # The flood must outlast the probes: loadgen starts (~0.3 s), then
            # sends for `seconds`; the probes ended this long after its start.
            out[label]["probes_ended_after"] = round(time.monotonic() - started, 3)
            report = finish(bg, seconds)
            out[label]["flood"] = {k: report[k] for k in ("sent", "rate", "elapsed")}
        log(f"freshness {label}: {', '.join(f'{d * 1e3:.2f}' for d in delays)} ms")
    return out
