"""What a process was doing when it went silent: a snapshot and a capture.

Before each kill (and each dry-run "would kill") the killer asks this module:

- ``Snapshot``: what the kernel knows about the pid, read from ``/proc`` where
  circusd runs on this host: the state letter (R, S, D, T, t, Z), ``wchan``,
  the CPU seconds it used since its last heartbeat, threads, RSS and open
  descriptors.  Any part that cannot be read is None, never an exception.
- ``CpuSampler``: the baseline of "CPU since its last heartbeat", taken off the
  hot path.  Once per tick it visits a bounded slice of the monitored pids in
  round robin, each pid about every ``loop_rate / 2`` seconds; for a pid whose
  ``last_seen`` changed since its previous visit it records the pid's CPU time.
  At kill time the CPU used since that visit is the CPU used since (at most
  one visit after) the last heartbeat.  Its state is one entry per monitored
  pid, dropped when the pid leaves the table.
- ``CaptureRunner``: ``diagnostic_command`` with ``{pid}`` and ``{watcher}``
  substituted (no shell), in its own session, for at most ``diagnostic_timeout``
  seconds (then its whole process group is SIGKILLed), output capped at
  ``OUTPUT_CAP`` bytes (the rest is read and discarded), at most
  ``diagnostic_concurrency`` at once (beyond that: skipped and counted).
- ``CaptureStore``: one file per kill under ``diagnostic_dir``, named by time,
  watcher and pid; the oldest removed past ``diagnostic_keep``.
- ``KillLog``: the last ``RECENT_KILLS`` kills for ``/status``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import os
import re
import shlex
import signal
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from .pids import stat_fields

if TYPE_CHECKING:
    from .config import Config

logger = logging.getLogger("circus.watchdog")

PROC = "/proc"
OUTPUT_CAP = 64 * 1024  # bytes of a capture's output kept (the rest is discarded)
LOG_CAP = 2000  # characters of a capture's output quoted in the log
RECENT_KILLS = 100  # kills kept for /status
# Pids the sampler visits per tick at most (about 3 to 12 ms when each needs a
# /proc read), so a huge fleet stretches the visits, not the tick.
MAX_VISITS = 1000
REAP_WAIT = 1.0  # seconds to wait for a killed capture to be reaped
_READ_CHUNK = 64 * 1024
UNREADABLE = -1  # Baseline.start of a pid whose /proc entry could not be read

try:
    _CLK_TCK = os.sysconf("SC_CLK_TCK")
    _PAGE = os.sysconf("SC_PAGE_SIZE")
except (AttributeError, ValueError, OSError):  # no sysconf: no /proc either
    _CLK_TCK, _PAGE = 100, 4096

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


class ProcStat(NamedTuple):
    """The fields of ``/proc/PID/stat`` the snapshot uses."""

    state: str
    cpu: float  # utime + stime, seconds
    threads: int
    rss: int  # bytes
    start: int  # clock ticks after boot: tells a reused pid apart


def read_stat(pid: int, proc: str = PROC) -> ProcStat | None:
    """``pid``'s state, CPU time, threads, RSS and start time, or None."""
    fields = stat_fields(pid, proc)
    if fields is None:
        return None
    try:
        return ProcStat(
            fields[0].decode("ascii"),
            (int(fields[11]) + int(fields[12])) / _CLK_TCK,  # fields 14, 15
            int(fields[17]),  # field 20
            int(fields[21]) * _PAGE,  # field 24
            int(fields[19]),  # field 22
        )
    except (ValueError, IndexError, UnicodeDecodeError):
        return None


def read_wchan(pid: int, proc: str = PROC) -> str | None:
    """The kernel function ``pid`` sleeps in, or None (running, hidden, gone)."""
    try:
        with open(f"{proc}/{pid}/wchan", "rb") as f:
            name = f.read(256).decode("ascii", "replace").strip()
    except OSError:
        return None
    return None if name in ("", "0") else name


def count_fds(pid: int, proc: str = PROC) -> int | None:
    """How many descriptors ``pid`` has open, or None."""
    try:
        return len(os.listdir(f"{proc}/{pid}/fd"))
    except OSError:
        return None


class Baseline(NamedTuple):
    """A pid's CPU time at the first sampler visit after a heartbeat."""

    beat: float  # the table's last_seen when the visit saw it (monotonic)
    cpu: float  # CPU seconds used by the pid then
    start: int  # the pid's start time (a reused pid has another); or UNREADABLE
    at: float  # when the visit took place (monotonic)


class _Table(Protocol):
    def pids(self) -> list[int]: ...

    def last_seen(self, pid: int) -> float: ...


class CpuSampler:
    """Per-pid CPU baselines, refreshed a bounded slice at a time."""

    def __init__(self, period: float, tick: float, proc: str = PROC) -> None:
        # Visit each pid every ``period`` (loop_rate / 2: a pid beating every
        # loop_rate costs one /proc read per beat, and the baseline is at most
        # period late); the MAX_VISITS cap stretches that for huge fleets.
        self._rounds_per_tick = tick / period
        self.proc = proc
        self._order: list[int] = []
        self._next = 0
        # Baselines of the pids visited in this round, and of the last round's
        # pids not visited yet: what is left there at the end of a round left
        # the table, and goes without a scan of the whole fleet.
        # Plain tuples of numbers: the garbage collector untracks those, so a
        # big fleet's baselines do not lengthen its full collections.
        self._base: dict[int, tuple[float, float, int, float]] = {}
        self._last_round: dict[int, tuple[float, float, int, float]] = {}

    def __len__(self) -> int:
        return len(self._base) + len(self._last_round)

    def visits(self, monitored: int) -> int:
        """Pids visited per tick for a fleet of ``monitored`` pids."""
        want = math.ceil(monitored * self._rounds_per_tick)
        return min(monitored, MAX_VISITS, max(1, want))

    def sample(self, table: _Table, now: float) -> None:
        """Visit the next slice of ``table``'s pids (call once per tick)."""
        if self._next >= len(self._order):  # a new round
            self._order = table.pids()
            self._next = 0
            self._last_round, self._base = self._base, {}
        end = min(len(self._order), self._next + self.visits(len(self._order)))
        for pid in self._order[self._next : end]:
            self._visit(table, pid, now)
        self._next = end

    def _visit(self, table: _Table, pid: int, now: float) -> None:
        old = self._last_round.pop(pid, None) or self._base.get(pid)
        try:
            beat = table.last_seen(pid)
        except KeyError:  # left the table since the round began
            self._base.pop(pid, None)
            return
        if old is not None and old[0] == beat:
            self._base[pid] = old  # no heartbeat since the last visit: keep it
            return
        stat = read_stat(pid, self.proc)
        if stat is None:  # remembered, so it is read again only after a beat
            self._base[pid] = (beat, 0.0, UNREADABLE, now)
        else:
            self._base[pid] = (beat, stat.cpu, stat.start, now)

    def baseline(self, pid: int) -> Baseline | None:
        """The latest baseline of ``pid``, if any."""
        found = self._base.get(pid) or self._last_round.get(pid)
        return None if found is None else Baseline._make(found)

    def forget(self, pid: int) -> None:
        """Drop ``pid``'s baseline (it was killed)."""
        self._base.pop(pid, None)
        self._last_round.pop(pid, None)


@dataclass(frozen=True)
class Snapshot:
    """What ``/proc`` says about a pid; a part it could not read is None."""

    pid: int
    state: str | None = None
    wchan: str | None = None
    cpu_since_beat: float | None = None
    cpu_window: float | None = None  # seconds that cpu_since_beat covers
    threads: int | None = None
    rss: int | None = None  # bytes
    fds: int | None = None

    @classmethod
    def take(
        cls,
        pid: int,
        baseline: Baseline | None = None,
        now: float | None = None,
        proc: str = PROC,
    ) -> Snapshot:
        """Read ``pid`` now; ``baseline`` (taken at ``baseline.at``) gives the
        CPU since its last heartbeat."""
        stat = read_stat(pid, proc)
        if stat is None:
            return cls(pid)
        cpu = window = None
        if baseline is not None and baseline.start == stat.start:
            cpu = round(max(0.0, stat.cpu - baseline.cpu), 2)
            if now is not None:
                window = round(max(0.0, now - baseline.at), 3)
        return cls(
            pid,
            stat.state,
            read_wchan(pid, proc),
            cpu,
            window,
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
        if self.cpu_since_beat is not None:
            parts.append(f"{self.cpu_since_beat:.2f} s CPU since its last heartbeat")
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


def expand(command: Sequence[str], pid: int, watcher: str) -> list[str]:
    """``command`` with ``{pid}`` and ``{watcher}`` replaced in each argument
    (``str.format`` rules, as config checks them: ``{{`` is a literal brace)."""
    out = []
    for word in command:
        try:
            out.append(word.format(pid=pid, watcher=watcher))
        except (ValueError, KeyError, IndexError, AttributeError):
            out.append(word)  # config refuses these; keep the word as written
    return out


class CaptureCounts(Protocol):
    """Where captures are counted (``metrics.Metrics`` is one)."""

    captures: int  # ran to a zero exit
    capture_failures: collections.Counter[str]  # by reason: timeout, error, skipped


@dataclass
class Counts:
    """A ``CaptureCounts`` of its own, for a runner used without metrics."""

    captures: int = 0
    capture_failures: collections.Counter[str] = field(
        default_factory=collections.Counter
    )


@dataclass
class Capture:
    """The outcome of one run of ``diagnostic_command``."""

    outcome: str  # made, timeout, error, skipped
    argv: list[str] = field(default_factory=list)
    detail: str = ""  # exit status or why it failed
    output: bytes = b""  # at most OUTPUT_CAP bytes
    size: int = 0  # bytes of output the command wrote in all


class CaptureRunner:
    """Runs ``diagnostic_command`` for a pid, bounded in time, output and number."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        timeout: float = 10.0,
        concurrency: int = 2,
        cap: int = OUTPUT_CAP,
        counts: CaptureCounts | None = None,
    ) -> None:
        self.command = tuple(command)
        self.timeout = timeout
        self.concurrency = concurrency
        self.cap = cap
        self.running = 0
        self.counts: CaptureCounts = Counts() if counts is None else counts

    async def run(self, pid: int, watcher: str) -> Capture:
        """Capture ``pid``; never raises (but CancelledError), never runs over."""
        argv = expand(self.command, pid, watcher)
        if self.running >= self.concurrency:
            return self._failed(
                Capture("skipped", argv),
                f"{self.running} capture(s) already running (diagnostic_concurrency)",
                watcher,
                pid,
            )
        self.running += 1
        try:
            capture = await self._run(argv)
        finally:
            self.running -= 1
        if capture.outcome != "made":
            return self._failed(capture, capture.detail, watcher, pid)
        self.counts.captures += 1
        return capture

    def _failed(self, capture: Capture, why: str, watcher: str, pid: int) -> Capture:
        self.counts.capture_failures[capture.outcome] += 1
        capture.detail = why
        tail = capture.output[-200:].decode("utf-8", "replace").strip()
        logger.warning(
            "diagnostic capture of %s pid %d %s: %s%s",
            watcher,
            pid,
            "skipped" if capture.outcome == "skipped" else "failed",
            why,
            f" (output ends: {tail!r})" if tail else "",
        )
        return capture

    async def _run(self, argv: list[str]) -> Capture:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # its own group: ended with its children
            )
        except OSError as exc:
            why = f"cannot run {argv[0]!r}: {exc.strerror or exc}"
            return Capture("error", argv, why)
        capture = Capture("made", argv)
        reading = asyncio.ensure_future(self._read(proc, capture))
        try:
            await asyncio.wait_for(asyncio.shield(reading), self.timeout)
        except asyncio.TimeoutError:
            await self._end(proc, reading)
            capture.outcome = "timeout"
            capture.detail = f"still running after {self.timeout:g} s: ended it"
            return capture
        except asyncio.CancelledError:
            await self._end(proc, reading)
            raise
        status = proc.returncode
        if status:
            capture.outcome = "error"
            capture.detail = (
                f"exited with status {status}"
                if status > 0
                else f"killed by {_signal_name(-status)}"
            )
        else:
            capture.detail = "exited with status 0"
        return capture

    async def _read(self, proc: asyncio.subprocess.Process, capture: Capture) -> None:
        assert proc.stdout is not None
        out = bytearray()
        while chunk := await proc.stdout.read(_READ_CHUNK):
            capture.size += len(chunk)
            if len(out) < self.cap:  # keep the head; read and drop the rest
                out += chunk[: self.cap - len(out)]
                capture.output = bytes(out)
        await proc.wait()

    @staticmethod
    async def _end(
        proc: asyncio.subprocess.Process, reading: asyncio.Future[None]
    ) -> None:
        # While its pipe is open or it runs, the group id is still in use by
        # one of its members, so the signal cannot reach a stranger.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(reading, REAP_WAIT)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


_NAME = re.compile(r"^\d{8}T\d{6}\.\d{6}Z-.+-\d+\.txt$")


class CaptureStore:
    """One file per kill in ``directory``; at most ``keep`` of them."""

    def __init__(self, directory: str, keep: int = 100) -> None:
        self.directory = directory
        self.keep = keep

    def name(self, when: float, watcher: str, pid: int) -> str:
        """``20261202T041500.123456Z-web-4242.txt``: sorts by time."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(when))
        micro = int(when % 1 * 1e6)
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", watcher)[:64] or "_"
        return f"{stamp}.{micro:06d}Z-{safe}-{pid}.txt"

    def write(self, when: float, watcher: str, pid: int, body: bytes) -> str | None:
        """Write ``body`` to a new file; its path, or None (logged) on failure."""
        path = os.path.join(self.directory, self.name(when, watcher, pid))
        try:
            os.makedirs(self.directory, exist_ok=True)
            # Captures may show a process's data: readable by the owner only.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(body)
        except OSError as exc:
            logger.warning("diagnostic_dir: cannot write %s: %s", path, exc)
            return None
        self.rotate()
        return path

    def rotate(self) -> None:
        """Remove the oldest capture files beyond ``keep`` (never other files)."""
        try:
            names = sorted(n for n in os.listdir(self.directory) if _NAME.match(n))
        except OSError:
            return
        for name in names[: max(0, len(names) - self.keep)]:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.directory, name))


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


class KillLog:
    """The last kills, for ``/status``'s ``recent_kills``."""

    def __init__(self, size: int = RECENT_KILLS) -> None:
        self._kills: collections.deque[dict[str, Any]] = collections.deque(maxlen=size)

    def __len__(self) -> int:
        return len(self._kills)

    def add(
        self,
        when: float,
        pid: int,
        watcher: str,
        silent_for: float,
        snapshot: Snapshot,
        capture: str | None,
        outcome: str,
    ) -> None:
        """Record a kill (``outcome``: killed, failed or dry_run)."""
        self._kills.append(
            {
                "time": round(when, 3),
                "pid": pid,
                "watcher": watcher,
                "silent_for": round(silent_for, 3),
                "state": snapshot.state,
                "cpu_since_beat": snapshot.cpu_since_beat,
                "capture": capture,
                "outcome": outcome,
            }
        )

    def newest_first(self) -> list[dict[str, Any]]:
        """The kills, newest first (by kill time, not by completion)."""
        return sorted(self._kills, key=lambda k: k["time"], reverse=True)


@dataclass(frozen=True)
class KillReport:
    """What ``Diagnostics.before_kill`` learnt about a pid it is about to kill."""

    when: float  # Unix time of the decision
    silent_for: float  # seconds since its last heartbeat
    snapshot: Snapshot
    capture: str | None  # path of the capture file


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
        self.sampler = CpuSampler(config.loop_rate / 2, config.tick, proc)
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

    def tick(self, table: _Table, now: float) -> None:
        """Refresh a slice of the CPU baselines (call once per tick)."""
        if self.local:
            self.sampler.sample(table, now)

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
        base = self.sampler.baseline(pid)
        self.sampler.forget(pid)
        silent = why.silent_for
        snapshot = (
            Snapshot.take(pid, base, why.now, self.proc) if inspect else Snapshot(pid)
        )
        line = kill_line(watcher, pid, why, snapshot, dry_run=dry_run)
        logger.warning("%s", line)
        capture = await self._capture(pid, watcher) if inspect else None
        path = None
        if self.store is not None:
            body = capture_file(when, watcher, pid, line, snapshot, capture)
            path = await asyncio.to_thread(self.store.write, when, watcher, pid, body)
        return KillReport(when, silent, snapshot, path)

    async def _capture(self, pid: int, watcher: str) -> Capture | None:
        if self.runner is None:
            return None
        capture = await self.runner.run(pid, watcher)
        if capture.outcome == "made":
            text = capture.output.decode("utf-8", "replace")
            logger.info(
                "diagnostic capture of %s pid %d (%s):\n%s%s",
                watcher,
                pid,
                shlex.join(capture.argv),
                text[:LOG_CAP],
                "\n[... truncated]" if len(text) > LOG_CAP else "",
            )
        return capture

    def record(self, pid: int, watcher: str, report: KillReport, outcome: str) -> None:
        """Add a kill to ``recent_kills`` (``outcome``: killed, failed, dry_run)."""
        self.kills.add(
            report.when,
            pid,
            watcher,
            report.silent_for,
            report.snapshot,
            report.capture,
            outcome,
        )

    def recent_kills(self) -> list[dict[str, Any]]:
        """The last ``RECENT_KILLS`` kills, newest first, as JSON data."""
        return self.kills.newest_first()
