"""Snapshot, CPU sampler, capture runner, capture files and recent kills
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
from circus_watchdog.config import Config
from circus_watchdog.diagnostics import (
    Baseline,
    CaptureRunner,
    CaptureStore,
    CpuSampler,
    Diagnostics,
    KillLog,
    Snapshot,
    Why,
    expand,
    kill_line,
    read_stat,
)
from circus_watchdog.metrics import Metrics
from support import run, wait_for

pytestmark = pytest.mark.skipif(
    not os.path.isdir("/proc/self"), reason="snapshots read /proc (Linux)"
)
BOUND = 10.0  # seconds any wait in these tests may take at most


@pytest.fixture
def spawn() -> Iterator[list[subprocess.Popen[bytes]]]:
    """A list to put child processes in; each is killed (with its group) and
    reaped at teardown."""
    children: list[subprocess.Popen[bytes]] = []
    yield children
    for child in children:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        except PermissionError:
            child.kill()
        child.wait(BOUND)


def start(children: list[subprocess.Popen[bytes]], *argv: str) -> int:
    child = subprocess.Popen(argv, start_new_session=True)
    children.append(child)
    return child.pid


def state_of(pid: int) -> str | None:
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


# -- snapshots of real processes ----------------------------------------------


def test_busy_loop_is_running_and_uses_cpu_since_its_beat(spawn):  # type: ignore[no-untyped-def]
    pid = start(spawn, sys.executable, "-c", "while True: pass")
    wait_for(lambda: state_of(pid) == "R", timeout=BOUND)
    sampler = CpuSampler(period=0.1, tick=0.1)
    table = FakeTable({pid: 100.0})
    t0 = time.monotonic()
    sampler.sample(table, t0)
    time.sleep(1.0)
    snap = Snapshot.take(pid, sampler.baseline(pid), time.monotonic())
    assert snap.state == "R"
    assert snap.cpu_window is not None and snap.cpu_window >= 1.0
    assert snap.cpu_since_beat is not None
    # Shared cores: the loop gets part of the wall time, never more than it.
    assert 0.1 < snap.cpu_since_beat <= snap.cpu_window + 0.05
    assert snap.threads == 1 and snap.rss and snap.fds
    assert snap.describe().startswith("running, ")


def test_sleeping_process_uses_no_cpu(spawn):  # type: ignore[no-untyped-def]
    pid = start(spawn, "sleep", "60")
    wait_for(lambda: state_of(pid) == "S", timeout=BOUND)
    sampler = CpuSampler(period=0.1, tick=0.1)
    sampler.sample(FakeTable({pid: 5.0}), time.monotonic())
    time.sleep(0.3)
    snap = Snapshot.take(pid, sampler.baseline(pid), time.monotonic())
    assert snap.state == "S"
    assert snap.cpu_since_beat == 0.0
    assert snap.describe().startswith("sleeping")
    assert "0.00 s CPU since its last heartbeat, 1 thread, " in snap.describe()


def test_stopped_process(spawn):  # type: ignore[no-untyped-def]
    pid = start(spawn, "sleep", "60")
    os.kill(pid, signal.SIGSTOP)
    wait_for(lambda: state_of(pid) == "T", timeout=BOUND)
    assert Snapshot.take(pid).describe().startswith("stopped, ")


def test_zombie(spawn):  # type: ignore[no-untyped-def]
    pid = start(spawn, "true")
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
    pid = start(spawn, str(tmp_path / "vf"))
    wait_for(lambda: state_of(pid) == "D", timeout=BOUND)
    snap = Snapshot.take(pid)
    assert snap.describe().startswith("in uninterruptible sleep (D)")


def test_gone_pid_is_all_none(spawn):  # type: ignore[no-untyped-def]
    pid = start(spawn, "true")
    spawn[-1].wait(BOUND)  # reaped: /proc/PID is gone
    snap = Snapshot.take(pid)
    assert snap == Snapshot(pid)
    assert snap.describe() == "no process snapshot (/proc not readable)"
    assert read_stat(pid) is None


def test_describe_reads_at_a_glance():  # type: ignore[no-untyped-def]
    snap = Snapshot(4242, "S", "futex_wait_queue", 0.0, 15.0, 12, 180_000_000, 9)
    assert kill_line("web", 4242, Why(15.24, 15, 0.0), snap) == (
        "killing web pid 4242: silent 15.2 s (timeout 15 s); sleeping in "
        "futex_wait_queue, 0.00 s CPU since its last heartbeat, 12 threads, "
        "180 MB, 9 open fds"
    )
    assert kill_line("web", 1, Why(3, 3, 0.0), Snapshot(1, "R"), dry_run=True) == (
        "dry run: would kill web pid 1: silent 3.0 s (timeout 3 s); running"
    )
    assert snap.as_dict()["wchan"] == "futex_wait_queue"


# -- the sampler, on a fake /proc ----------------------------------------------


def fake_stat(proc: Path, pid: int, cpu_ticks: int, start: int = 7) -> None:
    # proc(5) field order; a command name with spaces and a ")" in it.
    fields = ["S"] + ["0"] * 10 + [str(cpu_ticks), "0"] + ["0"] * 4 + ["3"]
    fields += ["0", str(start), "0", "25"]
    (proc / str(pid)).mkdir(exist_ok=True)
    (proc / str(pid) / "stat").write_text(f"{pid} (a b) c) " + " ".join(fields))


def test_sampler_baseline_follows_heartbeats(tmp_path):  # type: ignore[no-untyped-def]
    tck = diagnostics._CLK_TCK
    fake_stat(tmp_path, 10, cpu_ticks=1 * tck)
    sampler = CpuSampler(period=1, tick=1, proc=str(tmp_path))
    table = FakeTable({10: 1.0})
    sampler.sample(table, 1.5)
    assert sampler.baseline(10) == Baseline(1.0, 1.0, 7, 1.5)
    fake_stat(tmp_path, 10, cpu_ticks=3 * tck)
    sampler.sample(table, 2.5)  # no heartbeat since: the baseline stays
    assert sampler.baseline(10) == Baseline(1.0, 1.0, 7, 1.5)
    snap = Snapshot.take(10, sampler.baseline(10), 4.0, str(tmp_path))
    assert (snap.cpu_since_beat, snap.cpu_window, snap.threads) == (2.0, 2.5, 3)
    table.last[10] = 3.0  # a heartbeat: a new baseline at the next visit
    sampler.sample(table, 3.5)
    assert sampler.baseline(10) == Baseline(3.0, 3.0, 7, 3.5)
    fake_stat(tmp_path, 10, cpu_ticks=9 * tck, start=8)  # the pid was reused
    assert (
        Snapshot.take(10, sampler.baseline(10), 4.0, str(tmp_path)).cpu_since_beat
        is None
    )


def test_sampler_state_is_bounded_by_the_monitored_pids(tmp_path):  # type: ignore[no-untyped-def]
    for pid in range(100, 140):
        fake_stat(tmp_path, pid, 1)
    sampler = CpuSampler(period=1, tick=1, proc=str(tmp_path))
    table = FakeTable({pid: 1.0 for pid in range(100, 140)})
    sampler.sample(table, 1.0)
    assert len(sampler) == 40
    for pid in range(100, 135):
        del table.last[pid]
    for _ in range(3):
        sampler.sample(table, 2.0)
    assert len(sampler) == 5
    table.last[999] = 1.0  # no /proc entry: remembered as unreadable
    sampler.sample(table, 3.0)
    sampler.sample(table, 3.0)
    assert len(sampler) == 6
    base = sampler.baseline(999)
    assert base is not None and base.start == diagnostics.UNREADABLE
    fake_stat(tmp_path, 999, 1)  # read again only after a heartbeat
    sampler.sample(table, 4.0)
    assert sampler.baseline(999) == base
    table.last[999] = 2.0
    sampler.sample(table, 5.0)
    assert sampler.baseline(999) == Baseline(2.0, 1 / diagnostics._CLK_TCK, 7, 5.0)


def test_sampler_visits_a_bounded_slice_per_tick(tmp_path):  # type: ignore[no-untyped-def]
    sampler = CpuSampler(period=30, tick=1)
    assert sampler.visits(10) == 1  # each pid about once per period
    assert sampler.visits(300) == 10
    assert sampler.visits(10_000_000) == diagnostics.MAX_VISITS
    assert CpuSampler(period=0.5, tick=1).visits(10) == 10  # at most all of them
    table = FakeTable({pid: 1.0 for pid in range(1, 601)})
    seen: list[int] = []
    table.last_seen = lambda pid: seen.append(pid) or 1.0  # type: ignore[method-assign]
    for tick in range(31):
        sampler.sample(table, float(tick))
    # Round robin: every pid once in 30 ticks, then the next round begins.
    assert seen[:600] == list(range(1, 601)) and seen[600:] == list(range(1, 21))


# -- the capture runner ----------------------------------------------------------


def runner(argv: list[str], **kw: float) -> CaptureRunner:
    return CaptureRunner(argv, **kw)  # type: ignore[arg-type]


def test_expand_substitutes_without_a_shell():  # type: ignore[no-untyped-def]
    argv = ["x", "--pid={pid}", "{watcher}", "{pid}{pid}", "{{}}", "{other}", "$(id)"]
    assert expand(argv, 42, "w {pid}") == [
        "x",
        "--pid=42",
        "w {pid}",
        "4242",
        "{}",
        "{other}",
        "$(id)",
    ]


def test_capture_gets_pid_and_watcher(loop_factory):  # type: ignore[no-untyped-def]
    r = runner(
        [sys.executable, "-c", "import sys; print(sys.argv[1:])", "{pid}", "{watcher}"]
    )
    capture = run(loop_factory, r.run(4242, "web app"))
    assert capture.outcome == "made", capture.detail
    assert capture.output == b"['4242', 'web app']\n"
    assert (r.counts.captures, r.running, sum(r.counts.capture_failures.values())) == (
        1,
        0,
        0,
    )


def test_capture_timeout_ends_the_whole_group(loop_factory, tmp_path):  # type: ignore[no-untyped-def]
    pids = tmp_path / "pids"
    # A child holding the pipe, one that let go of it, and the command itself.
    script = (
        f"sleep 1000 & echo $! >> {pids}; "
        f"(sleep 1000 >/dev/null 2>&1 & echo $! >> {pids}); "
        f"echo started; sleep 1000"
    )
    r = runner(["sh", "-c", script], timeout=1.0)
    t0 = time.monotonic()
    capture = run(loop_factory, r.run(1, "w"))
    took = time.monotonic() - t0
    assert capture.outcome == "timeout"
    assert capture.output == b"started\n"
    assert took < 1.0 + diagnostics.REAP_WAIT + 1.0
    assert r.counts.capture_failures == {"timeout": 1}
    children = [int(p) for p in pids.read_text().split()]
    assert len(children) == 2
    for pid in children:
        wait_for(lambda pid=pid: state_of(pid) in (None, "Z"), timeout=BOUND)


def test_cancelled_capture_ends_its_group(loop_factory, tmp_path):  # type: ignore[no-untyped-def]
    pids = tmp_path / "pids"
    r = runner(["sh", "-c", f"sleep 1000 & echo $! >> {pids}; wait"], timeout=BOUND)

    async def cancel_soon() -> None:
        task = asyncio.ensure_future(r.run(1, "w"))
        for _ in range(100):  # until the command has started its child
            if pids.exists() and pids.read_text().strip():
                break
            await asyncio.sleep(0.05)
        task.cancel()  # the watchdog is stopping
        with pytest.raises(asyncio.CancelledError):
            await task

    run(loop_factory, cancel_soon())
    child = int(pids.read_text())
    wait_for(lambda: state_of(child) in (None, "Z"), timeout=BOUND)
    assert r.running == 0


def test_capture_output_is_capped(loop_factory):  # type: ignore[no-untyped-def]
    size = 120 * 1024 * 1024
    r = runner(["head", "-c", str(size), "/dev/zero"], timeout=BOUND)
    capture = run(loop_factory, r.run(1, "w"))
    assert capture.outcome == "made", capture.detail
    assert capture.size == size
    assert capture.output == b"\0" * diagnostics.OUTPUT_CAP


def test_missing_program_is_one_warning(loop_factory, caplog):  # type: ignore[no-untyped-def]
    r = runner(["no-such-debugger-here", "{pid}"])
    with caplog.at_level(logging.WARNING, "circus.watchdog"):
        capture = run(loop_factory, r.run(7, "w"))
    assert capture.outcome == "error"
    assert "cannot run 'no-such-debugger-here'" in capture.detail
    assert r.counts.capture_failures == {"error": 1}
    assert len(caplog.records) == 1 and "pid 7" in caplog.records[0].getMessage()


def test_failing_command_is_an_error(loop_factory, caplog):  # type: ignore[no-untyped-def]
    r = runner(["sh", "-c", "echo 'ptrace: Operation not permitted' >&2; exit 3"])
    with caplog.at_level(logging.WARNING, "circus.watchdog"):
        capture = run(loop_factory, r.run(7, "w"))
    assert (capture.outcome, capture.detail) == ("error", "exited with status 3")
    assert "Operation not permitted" in caplog.records[0].getMessage()


def test_concurrency_limit_skips_the_rest(loop_factory, tmp_path):  # type: ignore[no-untyped-def]
    log = tmp_path / "log"
    # Each run logs its start and end: the file shows how many overlapped.
    script = f"echo start >> {log}; sleep 0.5; echo end >> {log}"
    r = runner(["sh", "-c", script], concurrency=2, timeout=BOUND)

    async def burst() -> list[str]:
        captures = await asyncio.gather(*(r.run(pid, "w") for pid in range(5)))
        return [c.outcome for c in captures]

    outcomes = run(loop_factory, burst())
    assert sorted(outcomes) == ["made", "made", "skipped", "skipped", "skipped"]
    assert r.counts.capture_failures == {"skipped": 3} and r.counts.captures == 2
    depth = peak = 0
    for line in log.read_text().split():
        depth += 1 if line == "start" else -1
        peak = max(peak, depth)
    assert peak == 2


# -- capture files and recent kills ----------------------------------------------


def test_store_names_and_rotation(tmp_path):  # type: ignore[no-untyped-def]
    store = CaptureStore(str(tmp_path / "d"), keep=3)
    paths = [store.write(1_700_000_000 + i, "../web", 40 + i, b"x") for i in range(5)]
    assert paths[0] is not None
    assert os.path.basename(paths[0]) == "20231114T221320.000000Z-.._web-40.txt"
    (tmp_path / "d" / "notes.txt").write_text("not a capture")
    store.write(1_800_000_000, "web", 1, b"y")
    assert sorted(os.listdir(tmp_path / "d")) == [
        os.path.basename(p) for p in paths[3:] if p is not None
    ] + ["20270115T080000.000000Z-web-1.txt", "notes.txt"]
    assert os.stat(paths[4]).st_mode & 0o777 == 0o600  # type: ignore[arg-type]


def test_store_unwritable_is_a_warning(tmp_path, caplog):  # type: ignore[no-untyped-def]
    (tmp_path / "file").write_text("")
    store = CaptureStore(str(tmp_path / "file" / "d"))
    with caplog.at_level(logging.WARNING, "circus.watchdog"):
        assert store.write(0, "w", 1, b"") is None
    assert "diagnostic_dir" in caplog.text


def test_kill_log_is_bounded_and_newest_first():  # type: ignore[no-untyped-def]
    kills = KillLog()
    for i in range(250):
        kills.add(1000.0 + i, i, "w", 3.0, Snapshot(i, "S", None, 0.0), None, "killed")
    recent = kills.newest_first()
    assert len(recent) == diagnostics.RECENT_KILLS
    assert [k["pid"] for k in recent] == list(range(249, 149, -1))
    assert recent[0] == {
        "time": 1249.0,
        "pid": 249,
        "watcher": "w",
        "silent_for": 3.0,
        "state": "S",
        "cpu_since_beat": 0.0,
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
    pid = start(spawn, "sleep", "60")
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
    diag.tick(FakeTable({pid: time.monotonic()}), time.monotonic())
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

    pid = start(spawn, "sleep", "60")  # our child: we play circusd
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


def test_sampler_over_both_cores(table_cls, spawn):  # type: ignore[no-untyped-def]
    pid = start(spawn, "sleep", "60")
    table = table_cls(3.0, 0.1)
    table.add(pid, "web", 1.0)
    table.add(4_000_000, "web", 1.0)  # no such process: remembered as unreadable
    sampler = CpuSampler(period=0.1, tick=0.1)
    sampler.sample(table, 1.5)
    base = sampler.baseline(pid)
    assert base is not None and (base.beat, base.at) == (1.0, 1.5) and base.cpu >= 0
    table.remove(4_000_000)
    with pytest.raises(KeyError):  # what the sampler expects of a pid gone mid-round
        table.last_seen(4_000_000)
    sampler.sample(table, 1.6)
    sampler.sample(table, 1.7)
    assert len(sampler) == 1 and sampler.baseline(4_000_000) is None
    table.beat(pid, 2.0)
    sampler.sample(table, 2.1)
    assert sampler.baseline(pid).beat == 2.0  # type: ignore[union-attr]
