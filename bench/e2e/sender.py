"""The sender: loadgen (``python -m circus_watchdog.loadgen``, one worker,
sendmmsg) as a process of its own, pinned away from the receivers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
GRACE = 30.0  # seconds past the duration before loadgen is killed


def pinned(cpu: int | None) -> Callable[[], None] | None:
    """A preexec_fn that pins the child to ``cpu`` (None: no pinning)."""
    if cpu is None:
        return None

    def pin() -> None:
        os.sched_setaffinity(0, {cpu})

    return pin


@dataclass(frozen=True)
class Sender:
    """loadgen sending heartbeats for the pids of circusd's watchers matching
    ``watchers`` (read from ``endpoint`` when it starts), pinned to ``cpu``."""

    endpoint: str
    watchers: str
    cpu: int | None

    def command(
        self, port: int, rate: str, *, duration: float, count: int = 0
    ) -> list[str]:
        """The loadgen command line."""
        cmd = [sys.executable, "-m", "circus_watchdog.loadgen"]
        cmd += ["--target", f"127.0.0.1:{port}"]
        cmd += ["--endpoint", self.endpoint, "--watchers", self.watchers]
        cmd += ["--rate", rate, "--duration", f"{duration:g}", "--json"]
        if count:
            cmd += ["--count", str(count)]
        return cmd

    def run(
        self, port: int, rate: str, *, duration: float, count: int = 0
    ) -> dict[str, Any]:
        """Send for ``duration`` seconds (or ``count`` datagrams); loadgen's report."""
        proc = self.start(port, rate, duration=duration, count=count)
        return finish(proc, duration)

    def start(
        self, port: int, rate: str, *, duration: float, count: int = 0
    ) -> subprocess.Popen[str]:
        """The same, in the background: pass the result to `finish`."""
        return subprocess.Popen(
            self.command(port, rate, duration=duration, count=count),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=pinned(self.cpu),
        )


def finish(proc: subprocess.Popen[str], duration: float) -> dict[str, Any]:
    """Wait for a loadgen started by `Sender.start`; its JSON report."""
    try:
        out, err = proc.communicate(timeout=duration + GRACE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen failed ({proc.returncode}): {err}")
    return dict(json.loads(out))
