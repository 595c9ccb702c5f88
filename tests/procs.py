"""Real child processes and a fake /proc tree, for the tests of procfs,
sampler, capture and diagnostics."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from types import TracebackType

from circus_watchdog.procfs import read_stat

BOUND = 10.0  # seconds any wait in these tests may take at most


class Children:
    """Child processes, each in its own session; on exit each is killed
    (with its group) and reaped."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *argv: str) -> int:
        """Start ``argv`` in a new session; its pid."""
        child = subprocess.Popen(argv, start_new_session=True)
        self.procs.append(child)
        return child.pid

    def __enter__(self) -> Children:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for child in self.procs:
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            except PermissionError:
                child.kill()
            child.wait(BOUND)


def state_of(pid: int) -> str | None:
    """``pid``'s state letter, or None."""
    stat = read_stat(pid)
    return None if stat is None else stat.state


class FakeTable:
    """The two table methods the sampler reads."""

    def __init__(self, last: dict[int, float]) -> None:
        self.last = last

    def pids(self) -> list[int]:
        return list(self.last)

    def last_seen(self, pid: int) -> float:
        return self.last[pid]


def fake_stat(proc: Path, pid: int, cpu_ticks: int, start: int = 7) -> None:
    """Write ``proc/PID/stat`` in proc(5)'s field order, with a command name
    that holds spaces and a ")"; 3 threads, RSS 25 pages."""
    fields = ["S"] + ["0"] * 10 + [str(cpu_ticks), "0"] + ["0"] * 4 + ["3"]
    fields += ["0", str(start), "0", "25"]
    (proc / str(pid)).mkdir(exist_ok=True)
    (proc / str(pid) / "stat").write_text(f"{pid} (a b) c) " + " ".join(fields))
