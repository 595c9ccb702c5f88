"""What a process was doing when it was killed: the kill record.

Before each kill (and each dry-run "would kill") the killer calls
``Diagnostics.before_kill``, which:

1. takes a ``Snapshot`` of the pid, where circusd runs on this host and the
   pid is its child: what ``/proc`` says (``procfs``: the state letter R, S,
   D, T, t, Z, ``wchan``, threads, RSS, open descriptors) and the CPU seconds
   it used since it started.  Any part that cannot be read is None, never an
   exception;
2. logs the kill line (``kill_line``): who, how long silent, why (the
   evidence over its last tick, see `evidence`, and any hold), the snapshot;
3. runs ``diagnostic_command`` (``capture.CaptureRunner``);
4. writes the capture file (``capture.CaptureStore``): the kill line, the
   snapshot and the command's output;
5. logs one line for a capture that ran (``capture_line``): where the file
   keeps its output, or, with no ``diagnostic_dir`` (or a failed write), the
   head of the output on that line, newlines escaped (at most ``LOG_CAP``
   characters).  A failed capture is one warning (``capture``).

It returns a ``KillReport``; once the kill is carried out (or failed, or was
a dry run) ``record`` adds it to ``KillLog``, the last ``RECENT_KILLS`` kills
that ``/status`` shows.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import shlex
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from .capture import Capture, CaptureCounts, CaptureRunner, CaptureStore
from .procfs import PROC, count_fds, read_stat, read_wchan

if TYPE_CHECKING:
    from .config import Config

__all__ = [
    "RECENT_KILLS",
    "Diagnostics",
    "KillLog",
    "KillReport",
    "Snapshot",
    "capture_file",
    "capture_line",
    "kill_line",
]

logger = logging.getLogger("circus.watchdog")

LOG_CAP = 2000  # characters of a capture's output quoted in the log (no file)
RECENT_KILLS = 100  # kills kept for /status

_STATES = {
    "R": "running",
    "S": "sleeping",
    "D": "in uninterruptible sleep (D)",
    "T": "stopped",
    "t": "stopped by a tracer",
    "Z": "a zombie (exited, not yet reaped)",
    "X": "dead",
    "I": "idle",
    "P": "parked",
    "W": "paging",
}


@dataclass(frozen=True)
class Snapshot:
    """What ``/proc`` says about a pid; a part it could not read is None."""

    pid: int
    state: str | None = None
    wchan: str | None = None
    cpu: float | None = None  # seconds of CPU since it started
    threads: int | None = None
    rss: int | None = None  # bytes
    fds: int | None = None

    @classmethod
    def take(cls, pid: int, proc: str = PROC) -> Snapshot:
        """Read ``pid`` now."""
        stat = read_stat(pid, proc)
        if stat is None:
            return cls(pid)
        return cls(
            pid,
            stat.state,
            read_wchan(pid, proc),
            round(stat.cpu, 2),
            stat.threads,
            stat.rss,
            count_fds(pid, proc),
        )

    def describe(self) -> str:
        """Words an operator reads at a glance."""
        if self.state is None:
            return "no process snapshot (/proc not readable)"
        words = _STATES.get(self.state, f"in state {self.state}")
        if self.wchan is not None and self.state in "SD":
            words += f" in {self.wchan}"
        parts = [words]
        if self.cpu is not None:
            parts.append(f"{self.cpu:.2f} s CPU since it started")
        if self.threads is not None:
            parts.append(f"{self.threads} thread{'s' if self.threads != 1 else ''}")
        if self.rss is not None:
            parts.append(f"{self.rss / 1e6:.0f} MB")
        if self.fds is not None:
            parts.append(f"{self.fds} open fds")
        return ", ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        """The snapshot as JSON data."""
        return asdict(self)


class Why(NamedTuple):
    """Why a pid is killed, as its kill line says it."""

    silent_for: float  # seconds since its last heartbeat
    timeout: float  # its watcher's timeout
    now: float  # monotonic time of the decision
    detail: str = ""  # the evidence and the hold, if any


def kill_line(
    watcher: str, pid: int, why: Why, snapshot: Snapshot, *, dry_run: bool = False
) -> str:
    """The log line of a kill: who, how long silent, why, and the snapshot."""
    verb = "dry run: would kill" if dry_run else "killing"
    detail = f"; {why.detail}" if why.detail else ""
    return (
        f"{verb} {watcher} pid {pid}: silent {why.silent_for:.1f} s "
        f"(timeout {why.timeout:g} s){detail}; {snapshot.describe()}"
    )


def capture_line(watcher: str, pid: int, capture: Capture, path: str | None) -> str:
    """The one log line of a capture that ran: the file that keeps its output,
    or with no file, the head of the output with its newlines escaped."""
    head = (
        f"diagnostic capture of {watcher} pid {pid} ({shlex.join(capture.argv)}): "
        f"{capture.size} bytes of output"
    )
    if path is not None:
        return f"{head} in {path}"
    text = capture.output.decode("utf-8", "replace")
    cut = len(text) > LOG_CAP or capture.size > len(capture.output)
    return f"{head}, no file kept: {text[:LOG_CAP]!r}{' [truncated]' if cut else ''}"


def capture_file(
    when: float,
    watcher: str,
    pid: int,
    headline: str,
    snapshot: Snapshot,
    capture: Capture | None,
) -> bytes:
    """The text of a capture file: the kill, the snapshot, the command's output."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when))
    lines = [
        f"# circus-watchdog diagnostics, {stamp}Z",
        headline,
        "",
        f"watcher: {watcher}",
        f"pid: {pid}",
    ]
    lines += [
        f"{k}: {'-' if v is None else v}"
        for k, v in snapshot.as_dict().items()
        if k != "pid"
    ]
    if capture is None:
        lines.append("command: none")
    else:
        lines += [
            f"command: {shlex.join(capture.argv)}",
            f"result: {capture.outcome}, {capture.detail}",
            f"output: {capture.size} bytes"
            + (
                f", the first {len(capture.output)} kept"
                if capture.size > len(capture.output)
                else ""
            ),
            "",
        ]
    head = "\n".join(lines).encode() + b"\n"
    return head + (capture.output if capture is not None else b"")


@dataclass(frozen=True)
class KillReport:
    """What ``Diagnostics.before_kill`` learnt about a pid it is about to kill."""

    when: float  # Unix time of the decision
    silent_for: float  # seconds since its last heartbeat
    snapshot: Snapshot
    capture: str | None  # path of the capture file
    why: str = ""  # the evidence and the hold, as in the kill line


class KillLog:
    """The last kills, for ``/status``'s ``recent_kills``."""

    def __init__(self, size: int = RECENT_KILLS) -> None:
        self._kills: collections.deque[dict[str, Any]] = collections.deque(maxlen=size)

    def __len__(self) -> int:
        return len(self._kills)

    def add(self, report: KillReport, watcher: str, outcome: str) -> None:
        """Record the kill ``report`` describes (``outcome``: killed, failed or
        dry_run)."""
        snapshot = report.snapshot
        self._kills.append(
            {
                "time": round(report.when, 3),
                "pid": snapshot.pid,
                "watcher": watcher,
                "silent_for": round(report.silent_for, 3),
                "state": snapshot.state,
                "cpu": snapshot.cpu,
                "why": report.why,
                "capture": report.capture,
                "outcome": outcome,
            }
        )

    def newest_first(self) -> list[dict[str, Any]]:
        """The kills, newest first (by kill time, not by completion)."""
        return sorted(self._kills, key=lambda k: k["time"], reverse=True)


class Diagnostics:
    """Snapshot, capture and record of every kill; the killer's one entry point."""

    def __init__(
        self,
        config: Config,
        counts: CaptureCounts | None = None,
        *,
        local: bool,
        proc: str = PROC,
    ) -> None:
        # Only where circusd runs on this host are its pids ours to inspect.
        self.local = local and os.path.isdir(proc)
        self.proc = proc
        self.runner = (
            CaptureRunner(
                config.diagnostic_command,
                timeout=config.diagnostic_timeout,
                concurrency=config.diagnostic_concurrency,
                counts=counts,
            )
            if config.diagnostic_command is not None and self.local
            else None
        )
        self.store = (
            CaptureStore(config.diagnostic_dir, config.diagnostic_keep)
            if config.diagnostic_dir is not None
            else None
        )
        self.kills = KillLog()
        if not self.local and config.diagnostic_command is not None:
            logger.warning(
                "diagnostic_command: circusd at %s is not on this host: its pids "
                "are not ours to inspect, so no snapshot and no capture",
                config.endpoint,
            )

    async def before_kill(
        self,
        pid: int,
        watcher: str,
        why: Why,
        *,
        dry_run: bool,
        inspect: bool = True,
    ) -> KillReport:
        """Snapshot ``pid``, log the kill line, run the capture, write the file.

        ``inspect`` false (the pid is not known to be circusd's here) leaves
        out the snapshot and the capture.  Returns within
        ``diagnostic_timeout`` (plus a second to reap) and never raises but
        CancelledError.
        """
        inspect = inspect and self.local
        when = time.time()
        silent = why.silent_for
        snapshot = Snapshot.take(pid, self.proc) if inspect else Snapshot(pid)
        line = kill_line(watcher, pid, why, snapshot, dry_run=dry_run)
        logger.warning("%s", line)
        capture = None
        if inspect and self.runner is not None:
            capture = await self.runner.run(pid, watcher)
        path = None
        if self.store is not None:
            body = capture_file(when, watcher, pid, line, snapshot, capture)
            path = await asyncio.to_thread(self.store.write, when, watcher, pid, body)
        if capture is not None and capture.outcome == "made":
            logger.info("%s", capture_line(watcher, pid, capture, path))
        return KillReport(when, silent, snapshot, path, why.detail)

    def record(self, pid: int, watcher: str, report: KillReport, outcome: str) -> None:
        """Add a kill to ``recent_kills`` (``outcome``: killed, failed, dry_run);
        ``pid`` is ``report.snapshot.pid``, named for the killer's reading."""
        self.kills.add(report, watcher, outcome)

    def recent_kills(self) -> list[dict[str, Any]]:
        """The last ``RECENT_KILLS`` kills, newest first, as JSON data."""
        return self.kills.newest_first()
