"""The C floors (bench/floors/): compiled with the system cc at run time into a
temporary directory, each run as a process of its own."""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

FLOORS = ("floor_block", "floor_sleep")
PAUSE = "pause"  # a fleet process for the fleet-rate run, not a floor
BEAT = "beat"  # a fleet process that beats once a second (beat.c)
SOURCES = Path(__file__).resolve().parent.parent / "floors"
START_LIMIT = 10.0  # seconds for a floor to print "ready"
STOP_LIMIT = 10.0  # seconds for a floor to print its count after SIGTERM
CC_LIMIT = 60.0  # seconds to compile one floor


def build(workdir: Path, kinds: tuple[str, ...] = FLOORS) -> dict[str, Path]:
    """Compile every floor (or ``kinds``) with ``cc -O2``; kind -> executable."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc) on PATH: cannot build bench/floors")
    out = {}
    for kind in kinds:
        exe = workdir / kind
        subprocess.run(
            [cc, "-O2", "-Wall", "-o", str(exe), str(SOURCES / f"{kind}.c")],
            check=True,
            capture_output=True,
            timeout=CC_LIMIT,
        )
        out[kind] = exe
    return out


class CountingProc:
    """A receiver process that prints ``ready PORT GRANTED`` once bound and
    ``count N`` when SIGTERM stops it: the C floors and bench/e2e/original.py."""

    def __init__(
        self,
        kind: str,
        cmd: list[str],
        *,
        preexec: Callable[[], None] | None = None,
        start_limit: float = START_LIMIT,
    ) -> None:
        self.kind = kind
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=preexec,
        )
        self.pid = self.proc.pid
        try:
            word, port, granted = self._line(start_limit).split()
        except BaseException:
            self.close()
            raise
        if word != "ready":
            self.close()
            raise RuntimeError(f"{kind}: expected 'ready', got {word!r}")
        self.port, self.rcvbuf = int(port), int(granted)

    def _line(self, limit: float) -> str:
        assert self.proc.stdout is not None
        # It prints two lines in its life; a hung one is killed by the timer.
        timer = threading.Timer(limit, self.proc.kill)
        timer.daemon = True
        timer.start()
        try:
            line = self.proc.stdout.readline()
        finally:
            timer.cancel()
        if not line:
            raise RuntimeError(f"{self.kind} exited ({self.proc.wait(STOP_LIMIT)})")
        return line

    def stop(self) -> int:
        """SIGTERM; the number of datagrams it read."""
        try:
            self.proc.send_signal(signal.SIGTERM)
            word, count = self._line(STOP_LIMIT).split()
            self.proc.wait(STOP_LIMIT)
        finally:
            self.close()
        if word != "count":
            raise RuntimeError(f"{self.kind}: expected 'count', got {word!r}")
        return int(count)

    def close(self) -> None:
        """Kill it if it still runs."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_LIMIT)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start_floor(
    exe: Path,
    rcvbuf: int,
    preexec: Callable[[], None] | None = None,
    port: int = 0,
) -> CountingProc:
    """Run a built floor on loopback ``port`` (0: a free one) with ``rcvbuf`` bytes."""
    cmd = [str(exe), str(port), str(rcvbuf), "0"]
    return CountingProc(exe.name, cmd, preexec=preexec)
