"""CaptureRunner and CaptureStore (capture.py), on real child processes."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time

import pytest

from circus_watchdog import capture as capture_mod
from circus_watchdog.capture import CaptureRunner, CaptureStore, expand
from procs import BOUND, state_of
from support import run, wait_for

pytestmark = pytest.mark.skipif(
    not os.path.isdir("/proc/self"), reason="checks the captures' children in /proc"
)


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
    assert took < 1.0 + capture_mod.REAP_WAIT + 1.0
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
    assert capture.output == b"\0" * capture_mod.OUTPUT_CAP


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


# -- the capture files ------------------------------------------------------------


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
