"""The receivers under test behind one interface.

``open()`` returns a `Run`: the pid whose CPU is counted, the UDP port to flood,
and ``finish()``, which returns the datagrams and heartbeats the receiver
counted since ``open()``. The floors and the original start a fresh process per
run (they print their count when they stop); the daemon keeps running and is
read through its /metrics.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from harness import Standalone, metric

from .floors import CountingProc, start_floor

ORIGINAL = Path(__file__).resolve().parent / "original.py"


@dataclass(frozen=True)
class Counted:
    datagrams: int
    heartbeats: int


class Run(Protocol):
    kind: str
    pid: int
    port: int

    def finish(self) -> Counted: ...


class Receiver(Protocol):
    kind: str
    port: int  # the UDP port it reads; 0: one chosen in open()

    def open(self) -> Run: ...


# -- processes that print their count: the C floors and the original ------------


class ProcRun:
    """A floor or the original, started for one run; stops in ``finish()``."""

    def __init__(self, proc: CountingProc) -> None:
        self._proc = proc
        self.kind, self.pid, self.port = proc.kind, proc.pid, proc.port

    def finish(self) -> Counted:
        n = self._proc.stop()
        # Only heartbeats of known pids are sent to these receivers.
        return Counted(n, n)


@dataclass
class FloorReceiver:
    """A C floor; a fresh process per run."""

    exe: Path
    rcvbuf: int
    preexec: Callable[[], None] | None = None
    port: int = 0  # 0: a free port

    @property
    def kind(self) -> str:
        return self.exe.name

    def open(self) -> Run:
        return ProcRun(start_floor(self.exe, self.rcvbuf, self.preexec, self.port))


@dataclass
class OriginalReceiver:
    """circus 0.19's WatchDog receive path (original.py); a fresh process per run."""

    rcvbuf: int
    pids: Sequence[int]
    preexec: Callable[[], None] | None = None
    kind: str = "original"
    port: int = 0  # 0: a free port

    def open(self) -> Run:
        cmd = [sys.executable, str(ORIGINAL), "--rcvbuf", str(self.rcvbuf)]
        cmd += ["--port", str(self.port)]
        cmd += ["--pids", ",".join(map(str, self.pids))]
        proc = CountingProc("original", cmd, preexec=self.preexec, start_limit=30)
        return ProcRun(proc)


# -- the standalone daemon ------------------------------------------------------


class DaemonRun:
    """A window of the running daemon: counts are /metrics deltas."""

    def __init__(self, kind: str, daemon: Standalone, port: int) -> None:
        self.kind, self._daemon = kind, daemon
        self.pid, self.port = daemon.proc.pid, port
        self._start = self._counts()

    def _counts(self) -> Counted:
        series = self._daemon.metrics()
        return Counted(
            int(metric(series, "datagrams_total")),
            int(metric(series, "heartbeats_total")),
        )

    def finish(self) -> Counted:
        end = self._counts()
        return Counted(
            end.datagrams - self._start.datagrams,
            end.heartbeats - self._start.heartbeats,
        )


@dataclass
class DaemonReceiver:
    """A running ``circus-watchdog`` (its UDP port is ``port``)."""

    kind: str
    daemon: Standalone
    port: int

    def open(self) -> Run:
        if self.daemon.proc.poll() is not None:
            raise RuntimeError(f"{self.kind} exited:\n{self.daemon.tail()}")
        return DaemonRun(self.kind, self.daemon, self.port)
