"""``diagnostic_command``: run it for a pid, bounded; keep its output in files.

``CaptureRunner`` runs the command with ``{pid}`` and ``{watcher}`` substituted
in each argument (no shell), in its own session, for at most
``diagnostic_timeout`` seconds (then its whole process group is SIGKILLed,
children included), keeps the first ``OUTPUT_CAP`` bytes of its output (the
rest is read and discarded, so the command never blocks on a full pipe), and
runs at most ``diagnostic_concurrency`` at once (beyond that a capture is
skipped).  Every failure (skipped, timeout, error) is one warning and is
counted by reason.

``CaptureStore`` keeps one file per kill under ``diagnostic_dir``, readable by
its owner only, named by time, watcher and pid so that names sort by time;
past ``diagnostic_keep`` files the oldest are removed (never a file it did not
name).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import re
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "OUTPUT_CAP",
    "Capture",
    "CaptureCounts",
    "CaptureRunner",
    "CaptureStore",
    "Counts",
    "expand",
]

logger = logging.getLogger("circus.watchdog")

OUTPUT_CAP = 64 * 1024  # bytes of a capture's output kept (the rest is discarded)
REAP_WAIT = 1.0  # seconds to wait for a killed capture to be reaped
_READ_CHUNK = 64 * 1024


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
