"""Snapshot, kill line, recent kills and the Diagnostics facade
(diagnostics.py), on real child processes, without circusd."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from circus_watchdog import diagnostics
from circus_watchdog.capture import Capture
from circus_watchdog.config import Config
from circus_watchdog.diagnostics import (
    Diagnostics,
    KillLog,
    KillReport,
    Snapshot,
    Why,
    capture_line,
    kill_line,
)
from circus_watchdog.metrics import Metrics
from circus_watchdog.procfs import read_stat
from procs import BOUND, Children, state_of
from support import run, wait_for

pytestmark = pytest.mark.skipif(
    not os.path.isdir("/proc/self"), reason="snapshots read /proc (Linux)"
)


@pytest.fixture
def spawn() -> Iterator[Children]:
    """Child processes, killed and reaped at teardown."""
    with Children() as children:
        yield children


# -- snapshots of real processes ----------------------------------------------


def test_busy_loop_is_running_and_uses_cpu_since_it_started(spawn):  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    pid = spawn.start(sys.executable, "-c", "while True: pass")
    wait_for(lambda: state_of(pid) == "R", timeout=BOUND)
    time.sleep(1.0)
    snap = Snapshot.take(pid)
    age = time.monotonic() - t0
    assert snap.state == "R"
    assert snap.cpu is not None
    # Shared cores: the loop gets part of the wall time, never more than it.
    assert 0.1 < snap.cpu <= age + 0.05
    assert snap.threads == 1 and snap.rss and snap.fds
    assert snap.describe().startswith("running, ")
    assert f"{snap.cpu:.2f} s CPU since it started, 1 thread, " in snap.describe()


def test_sleeping_process_uses_little_cpu(spawn):  # type: ignore[no-untyped-def]
    pid = spawn.start("sleep", "60")
    wait_for(lambda: state_of(pid) == "S", timeout=BOUND)
    before = Snapshot.take(pid)
    time.sleep(0.3)
    snap = Snapshot.take(pid)
    assert snap.state == "S"
    assert snap.cpu is not None and snap.cpu == before.cpu  # none while asleep
    assert snap.describe().startswith("sleeping")


def test_stopped_process(spawn):  # type: ignore[no-untyped-def]
    pid = spawn.start("sleep", "60")
    os.kill(pid, signal.SIGSTOP)
    wait_for(lambda: state_of(pid) == "T", timeout=BOUND)
    assert Snapshot.take(pid).describe().startswith("stopped, ")


def test_zombie(spawn):  # type: ignore[no-untyped-def]
    pid = spawn.start("true")
    wait_for(lambda: state_of(pid) == "Z", timeout=BOUND)  # exited, not reaped
    assert Snapshot.take(pid).state == "Z"


def test_uninterruptible_sleep_of_a_vfork_parent(spawn, tmp_path):  # type: ignore[no-untyped-def]
    # A vfork(2) parent waits for its child's exec or exit in TASK_KILLABLE,
    # which /proc shows as D: a real D state that needs no FUSE or NFS.
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the vfork program")
    source = tmp_path / "vf.c"
    source.write_text(
        "#include <unistd.h>\n"
        "int main(void) { if (vfork() == 0) { pause(); _exit(0); } return 0; }\n"
    )
    subprocess.run([cc, "-o", str(tmp_path / "vf"), str(source)], check=True)
    pid = spawn.start(str(tmp_path / "vf"))
    wait_for(lambda: state_of(pid) == "D", timeout=BOUND)
    snap = Snapshot.take(pid)
    assert snap.describe().startswith("in uninterruptible sleep (D)")


def test_gone_pid_is_all_none(spawn):  # type: ignore[no-untyped-def]
    pid = spawn.start("true")
    spawn.procs[-1].wait(BOUND)  # reaped: /proc/PID is gone
    snap = Snapshot.take(pid)
    assert snap == Snapshot(pid)
    assert snap.describe() == "no process snapshot (/proc not readable)"
    assert read_stat(pid) is None


def test_describe_reads_at_a_glance():  # type: ignore[no-untyped-def]
    snap = Snapshot(4242, "S", "futex_wait_queue", 0.02, 12, 180_000_000, 9)
    detail = "ran 0.00 s and waited 0.00 s for a CPU in the last 1.00 s"
    assert kill_line("web", 4242, Why(16.24, 15, 0.0, detail), snap) == (
        "killing web pid 4242: silent 16.2 s (timeout 15 s); ran 0.00 s and "
        "waited 0.00 s for a CPU in the last 1.00 s; sleeping in "
        "futex_wait_queue, 0.02 s CPU since it started, 12 threads, "
        "180 MB, 9 open fds"
    )
    assert kill_line("web", 1, Why(3, 3, 0.0), Snapshot(1, "R"), dry_run=True) == (
        "dry run: would kill web pid 1: silent 3.0 s (timeout 3 s); running"
    )
    assert snap.as_dict()["wchan"] == "futex_wait_queue"


# -- recent kills and the facade ------------------------------------------------


def test_kill_log_is_bounded_and_newest_first():  # type: ignore[no-untyped-def]
    kills = KillLog()
    for i in range(250):
        report = KillReport(1000.0 + i, 3.0, Snapshot(i, "S", None, 0.0), None)
        kills.add(report, "w", "killed")
    recent = kills.newest_first()
    assert len(recent) == diagnostics.RECENT_KILLS
    assert [k["pid"] for k in recent] == list(range(249, 149, -1))
    assert recent[0] == {
        "time": 1249.0,
        "pid": 249,
        "watcher": "w",
        "silent_for": 3.0,
        "state": "S",
        "cpu": 0.0,
        "why": "",
        "capture": None,
        "outcome": "killed",
    }


def keys(capture: str) -> list[str]:
    head = capture.split("\n\n")[1]  # between the kill line and the output
    return [line.split(":")[0] for line in head.splitlines()]


def documented_capture() -> str:
    docs = Path(__file__).resolve().parent.parent / "docs" / "operations.md"
    section = docs.read_text().split("### Reading a capture", 1)[1]
    return section.split("```\n", 2)[1]


def test_before_kill_writes_snapshot_and_capture(loop_factory, spawn, tmp_path):  # type: ignore[no-untyped-def]
    pid = spawn.start("sleep", "60")
    wait_for(lambda: state_of(pid) == "S", timeout=BOUND)
    config = Config.from_options(
        {
            "loop_rate": "1",
            "diagnostic_command": "sh -c 'echo stack of {watcher} {pid}'",
            "diagnostic_dir": str(tmp_path / "caps"),
        },
        endpoint="tcp://127.0.0.1:5555",
    )
    metrics = Metrics()
    diag = Diagnostics(config, metrics, local=True)
    report = run(
        loop_factory,
        diag.before_kill(
            pid, "web", Why(3.5, 3.0, time.monotonic() + 3.5), dry_run=False
        ),
    )
    assert report.snapshot.state == "S" and report.silent_for >= 3.5
    assert report.capture is not None
    text = Path(report.capture).read_text()
    assert f"killing web pid {pid}: silent" in text
    assert "state: S" in text and "result: made, exited with status 0" in text
    assert text.endswith(f"stack of web {pid}\n")
    assert text.count(f"pid: {pid}\n") == 1
    # The documented capture ("Reading a capture") has the same fields in order.
    assert keys(text) == keys(documented_capture())
    diag.record(pid, "web", report, "killed")
    assert diag.recent_kills()[0]["capture"] == report.capture
    assert (metrics.captures, metrics.capture_failures) == (1, {})


# -- the killer inspects only circusd's own children ------------------------------


class Dstats:
    """A circusd client that answers ``dstats`` with ``pid`` (and ok to the rest)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.calls: list[str] = []

    async def call(self, command: str, **props: object) -> dict[str, object]:
        self.calls.append(command)
        if command == "dstats":
            return {"status": "ok", "info": {"pid": self.pid}}
        return {"status": "ok"}


@pytest.mark.parametrize("circusd_is_parent", [True, False])
def test_killer_inspects_only_children_of_circusd(  # type: ignore[no-untyped-def]
    circusd_is_parent, spawn, tmp_path, caplog
):
    from circus_watchdog._core import HeartbeatTable
    from circus_watchdog.killer import Killer
    from circus_watchdog.registry import Registry

    pid = spawn.start("sleep", "60")  # our child: we play circusd
    wait_for(lambda: state_of(pid) == "S", timeout=BOUND)
    marker = tmp_path / "ran"
    config = Config.from_options(
        {"loop_rate": "1", "diagnostic_command": f"touch {marker}"},
        endpoint="tcp://127.0.0.1:5555",
    )
    registry = Registry(
        HeartbeatTable(config.timeout, config.tick), config, self_pids=[]
    )
    registry.apply_listing({"web": [pid]}, 0.0, fresh=True)
    # Another pid namespace looks like this: circusd's pid is not the parent.
    client = Dstats(os.getpid() if circusd_is_parent else 1)
    metrics = Metrics()
    diagnostics = Diagnostics(config, metrics, local=True)
    killer = Killer(client, registry, metrics, config, diagnostics, local=True)  # type: ignore[arg-type]

    async def dry_run() -> None:
        killer.kill(pid, "web", Why(3.0, 3.0, 5.0), dry_run=True)
        await asyncio.gather(*killer._tasks)

    with caplog.at_level(logging.WARNING, "circus.watchdog"):
        run(asyncio.new_event_loop, dry_run())
    kill = diagnostics.recent_kills()[0]
    assert (kill["pid"], kill["outcome"]) == (pid, "dry_run")
    assert client.calls == ["dstats"]
    if circusd_is_parent:
        assert kill["state"] == "S" and marker.exists()
    else:
        assert kill["state"] is None and not marker.exists()
        assert "is not circusd (pid 1): another pid namespace?" in caplog.text


@pytest.mark.parametrize("keep", [True, False], ids=["file", "no-file"])
def test_a_capture_is_one_log_line(loop_factory, spawn, tmp_path, caplog, keep):  # type: ignore[no-untyped-def]
    pid = spawn.start("sleep", "60")
    wait_for(lambda: state_of(pid) == "S", timeout=BOUND)
    options = {
        "loop_rate": "1",
        "diagnostic_command": "sh -c 'echo frame one; echo frame two of {pid}'",
    }
    if keep:
        options["diagnostic_dir"] = str(tmp_path / "caps")
    config = Config.from_options(options, endpoint="tcp://127.0.0.1:5555")
    diag = Diagnostics(config, Metrics(), local=True)
    with caplog.at_level(logging.INFO, "circus.watchdog"):
        report = run(
            loop_factory,
            diag.before_kill(
                pid, "web", Why(3.0, 3.0, time.monotonic()), dry_run=False
            ),
        )
    output = f"frame one\nframe two of {pid}\n"
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "\n" in m]  # the kill line, the capture line
    [line] = [m for m in messages if m.startswith("diagnostic capture of")]
    assert line.startswith(f"diagnostic capture of web pid {pid} (sh -c ")
    if keep:
        assert report.capture is not None
        assert line.endswith(f": {len(output)} bytes of output in {report.capture}")
        assert Path(report.capture).read_text().endswith(output)
    else:
        assert report.capture is None
        assert line.endswith(f"bytes of output, no file kept: {output!r}")


def test_capture_line_says_when_the_log_holds_only_the_head():  # type: ignore[no-untyped-def]
    kept = Capture("made", ["gdb", "-p", "7"], output=b"x" * 10, size=10_000)
    assert capture_line("web", 7, kept, None) == (
        "diagnostic capture of web pid 7 (gdb -p 7): 10000 bytes of output, "
        "no file kept: 'xxxxxxxxxx' [truncated]"
    )
    long = Capture("made", ["x"], output=b"y" * (diagnostics.LOG_CAP + 1), size=1)
    assert capture_line("w", 1, long, None).endswith("y' [truncated]")
    assert capture_line("w", 1, kept, "/c/f.txt").endswith("of output in /c/f.txt")
