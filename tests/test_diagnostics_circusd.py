"""Diagnostics before a kill on a real circusd, with the standalone
``circus-watchdog``: the real ``py-spy dump`` names the function a hung worker
is stuck in; a missing program and a command that outlives
``diagnostic_timeout`` do not hold the kill past it; a burst of kills runs at
most ``diagnostic_concurrency`` captures at once; ``recent_kills`` in
``/status``; a dry run captures and kills nothing.

Diagnostics are not core code: each test runs on whichever core is built.
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from support import (
    SLEEPER,
    Circusd,
    Standalone,
    free_udp_port,
    hang_times,
    kills,
    metric,
    wait_for,
    wait_pids,
    worker_cmd,
)

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")

Start = Callable[..., Circusd]
LOOP_RATE = 0.5  # seconds
MAX_COUNT = 2
TIMEOUT = LOOP_RATE * MAX_COUNT
TICK = LOOP_RATE / 10
DOCS = Path(__file__).resolve().parent.parent / "docs" / "operations.md"
PY_SPY = Path(sys.executable).with_name("py-spy")
FUNCTION = "wedged_in_frobnicate_the_widgets"

# Heartbeats for 1.5 s, notes its last one in argv[2], then deadlocks inside
# FUNCTION (a second acquire of a held lock); exits once circusd is gone.
HANGER = f"""
import os, socket, sys, threading, time
port, hangs = int(sys.argv[1]), sys.argv[2]
parent, sock = os.getppid(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
end = time.monotonic() + 1.5
while time.monotonic() < end:
    sock.sendto(f"{{os.getpid()}};{{time.time()}}".encode(), ("127.0.0.1", port))
    last = time.time()
    time.sleep(0.1)
with open(hangs, "a") as out:
    out.write(f"{{os.getpid()}} {{last:.6f}}\\n")
lock = threading.Lock()
def {FUNCTION}():
    lock.acquire()
    while os.getppid() == parent and not lock.acquire(timeout=1):
        pass
{FUNCTION}()
"""


def flags(*more: str) -> list[str]:
    return ["--loop-rate", str(LOOP_RATE), "--max-count", str(MAX_COUNT), *more]


def docs_options() -> dict[str, str]:
    """The ``[plugin:watchdog]`` example of "Diagnostics before a kill"."""
    section = DOCS.read_text().split("## Diagnostics before a kill", 1)[1]
    block = re.search(r"```ini\n(.*?)```", section, re.S)
    assert block is not None
    ini = configparser.ConfigParser(interpolation=None)
    ini.read_string(block[1])
    return dict(ini["plugin:watchdog"])


def py_spy_works() -> str | None:
    """None if py-spy can dump a child of ours; else why not."""
    if not PY_SPY.exists():
        return f"py-spy is not installed next to {sys.executable}"
    argv = [sys.executable, "-c", "import time; print(1, flush=True); time.sleep(30)"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE) as child:
        try:
            assert child.stdout is not None and child.stdout.readline() == b"1\n"
            probe = subprocess.run(
                [str(PY_SPY), "dump", "--pid", str(child.pid)],
                capture_output=True,
                timeout=20,
                text=True,
            )
        finally:
            child.kill()
    if probe.returncode != 0:
        return (
            "py-spy cannot attach here (ptrace not permitted?): "
            + (probe.stderr.strip().splitlines() or ["no message"])[0]
        )
    return None


def gone_within(circusd: Circusd, watcher: str, pid: int, bound: float) -> float:
    """Wait until circusd no longer lists ``pid``; the time.time() then."""
    circusd.wait_for(lambda: pid not in circusd.pids(watcher), bound, interval=0.02)
    return time.time()


def test_py_spy_capture_names_the_hung_function(
    circusd_factory: Start, standalone: Callable[..., Standalone], tmp_path: Path
) -> None:
    why = py_spy_works()
    if why is not None:
        pytest.skip(why)
    options = docs_options()  # the documented example, run as written
    (passed,) = shlex.split(options["diagnostic_command"])  # circus unquotes it
    argv = shlex.split(passed)
    assert argv[0] == "py-spy"
    command = shlex.join([str(PY_SPY), *argv[1:]])
    udp, hangs, captures = free_udp_port(), tmp_path / "hangs", tmp_path / "caps"
    script = tmp_path / "hanger.py"
    script.write_text(HANGER)
    cmd = shlex.join([sys.executable, str(script), str(udp), str(hangs)])
    circusd = circusd_factory(f"[watcher:hung]\ncmd = {cmd}\nnumprocesses = 1\n")
    pid = wait_pids(circusd, {"hung": 1})["hung"][0]
    wd = standalone(
        circusd,
        *flags("--port", str(udp), "--diagnostic-command", command),
        *("--diagnostic-dir", str(captures)),
        *("--diagnostic-timeout", options["diagnostic_timeout"]),
        *("--diagnostic-keep", options["diagnostic_keep"]),
        *("--diagnostic-concurrency", options["diagnostic_concurrency"]),
        core=None,
    )
    bound = TIMEOUT + float(options["diagnostic_timeout"]) + 1
    gone_at = gone_within(circusd, "hung", pid, 1.5 + bound + 5)
    last_beat = wait_for(lambda: hang_times(hangs).get(pid), timeout=1)
    assert TIMEOUT - 0.05 <= gone_at - last_beat <= bound, wd.tail()
    kill = wait_for(lambda: wd.status()["recent_kills"], timeout=2)[-1]
    assert (kill["pid"], kill["watcher"], kill["outcome"]) == (pid, "hung", "killed")
    assert kill["state"] == "S"  # asleep on the lock, not spinning
    assert ran_share(kill) < 0.1  # in the evidence window before the kill
    assert TIMEOUT <= kill["silent_for"] <= TIMEOUT + 1
    text = Path(kill["capture"]).read_text()
    assert "result: made, exited with status 0" in text, text
    assert FUNCTION in text, text  # py-spy saw where it hung
    assert re.search(
        rf"killing hung pid {pid}: silent \d+\.\d s \(timeout 1 s\); "
        r"ran \S+ s and waited \S+ s for a CPU in the last \S+ s; "
        r"sleeping",
        wd.tail(),
    )
    assert metric(wd.metrics(), "captures_total") >= 1


@pytest.mark.parametrize("case", ["missing", "slow"])
def test_failed_capture_does_not_hold_the_kill(
    case: str,
    circusd_factory: Start,
    standalone: Callable[..., Standalone],
    tmp_path: Path,
) -> None:
    udp, hangs, seen = free_udp_port(), tmp_path / "hangs", tmp_path / "seen"
    diagnostic_timeout = 1.5
    if case == "missing":
        command, reason = "no-such-debugger --pid {pid}", "error"
    else:  # it and a child of its own outlive diagnostic_timeout
        script = f"echo $$ >> {seen}; sleep 60 & echo $! >> {seen}; wait"
        command, reason = shlex.join(["sh", "-c", script, "{pid}"]), "timeout"
    cmd = worker_cmd(udp, interval=0.1, hang_after=1.5, hang_file=hangs)
    circusd = circusd_factory(f"[watcher:web]\ncmd = {cmd}\nnumprocesses = 1\n")
    pid = wait_pids(circusd, {"web": 1})["web"][0]
    wd = standalone(
        circusd,
        *flags("--port", str(udp), "--diagnostic-command", command),
        *("--diagnostic-timeout", str(diagnostic_timeout)),
        core=None,
    )
    bound = TIMEOUT + diagnostic_timeout + 1
    gone_at = gone_within(circusd, "web", pid, 1.5 + bound + 5)
    last_beat = wait_for(lambda: hang_times(hangs).get(pid), timeout=1)
    assert TIMEOUT - 0.05 <= gone_at - last_beat <= bound, wd.tail()
    series = wait_for(lambda: kills(wd.metrics()) and wd.metrics(), timeout=3)
    assert metric(series, "capture_failures_total", reason=reason) >= 1
    assert f"diagnostic capture of web pid {pid} failed" in wd.tail()
    if case == "slow":
        started = [int(p) for p in seen.read_text().split()[:2]]
        for proc in started:  # the command and its child: its group was ended
            wait_for(lambda proc=proc: not _running(proc), timeout=2)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def test_burst_runs_at_most_the_concurrency_limit(
    circusd_factory: Start, standalone: Callable[..., Standalone], tmp_path: Path
) -> None:
    udp, log, captures = free_udp_port(), tmp_path / "log", tmp_path / "caps"
    # Each capture notes its start and end: the log shows how many overlapped.
    script = f"echo start >> {log}; sleep 1; echo end >> {log}; echo pid $1"
    circusd = circusd_factory(f"[watcher:silent]\ncmd = {SLEEPER}\nnumprocesses = 5\n")
    pids = wait_pids(circusd, {"silent": 5})["silent"]
    wd = standalone(
        circusd,
        *flags("--port", str(udp), "--no-storm-guard"),
        *("--diagnostic-command", shlex.join(["sh", "-c", script, "_", "{pid}"])),
        *("--diagnostic-concurrency", "2", "--diagnostic-dir", str(captures)),
        core=None,
    )
    # All five were learnt at once, so they go silent on the same tick.
    recent = wait_for(
        lambda: len(wd.status()["recent_kills"]) >= 5 and wd.status()["recent_kills"],
        timeout=TIMEOUT + 10,
    )
    first = [k for k in recent if k["pid"] in pids]
    assert sorted(k["pid"] for k in first) == sorted(pids)
    assert all(k["outcome"] == "killed" for k in first)
    times = [k["time"] for k in recent]
    assert times == sorted(times, reverse=True)  # newest first
    series = wd.metrics()
    assert metric(series, "capture_failures_total", reason="skipped") >= 3
    assert metric(series, "captures_total") >= 2
    depth = peak = 0
    for line in log.read_text().split():
        depth += 1 if line == "start" else -1
        peak = max(peak, depth)
    assert peak == 2
    # Every kill has its file: the snapshot, and the output when it ran.
    with_output = [
        k
        for k in first
        if "pid " + str(k["pid"]) in Path(k["capture"]).read_text().splitlines()[-1]
    ]
    assert len(with_output) == 2


def test_dry_run_captures_and_kills_nothing(
    circusd_factory: Start, standalone: Callable[..., Standalone], tmp_path: Path
) -> None:
    udp, captures = free_udp_port(), tmp_path / "caps"
    # One silent process asleep, one spinning (until circusd is gone).
    busy = shlex.join(
        [
            sys.executable,
            "-c",
            "import os; p = os.getppid(); any(os.getppid() != p for _ in iter(int, 1))",
        ]
    )
    circusd = circusd_factory(
        f"[watcher:silent]\ncmd = {SLEEPER}\nnumprocesses = 1\n\n"
        f"[watcher:busy]\ncmd = {busy}\nnumprocesses = 1\n"
    )
    pids = wait_pids(circusd, {"silent": 1, "busy": 1})
    wd = standalone(
        circusd,
        *flags("--port", str(udp), "--dry-run"),
        *("--diagnostic-command", "echo would capture {watcher} {pid}"),
        *("--diagnostic-dir", str(captures)),
        core=None,
    )
    recent = wait_for(
        lambda: len(wd.status()["recent_kills"]) >= 2 and wd.status()["recent_kills"],
        timeout=TIMEOUT + 5,
    )
    by_watcher = {k["watcher"]: k for k in recent}
    asleep, spinning = by_watcher["silent"], by_watcher["busy"]
    assert (asleep["pid"], asleep["outcome"], asleep["state"]) == (
        pids["silent"][0],
        "dry_run",
        "S",
    )
    assert ran_share(asleep) < 0.1
    assert (spinning["pid"], spinning["state"]) == (pids["busy"][0], "R")
    # It spun through the evidence window (the machine's cores are shared).
    assert ran_share(spinning) > 0.1
    cpu = spinning["cpu"]
    assert cpu is not None and 0.2 <= cpu
    pid = pids["silent"][0]
    text = Path(asleep["capture"]).read_text()
    assert text.startswith("# circus-watchdog diagnostics")
    assert f"dry run: would kill silent pid {pid}" in text
    assert text.endswith(f"would capture silent {pid}\n")
    assert circusd.pids("silent") == [pid] and circusd.pids("busy") == pids["busy"]
    assert kills(wd.metrics()) == {}


def ran_share(kill: dict[str, Any]) -> float:
    """The share of the evidence window a killed pid ran, from its ``why``."""
    pattern = r"ran (\S+) s and waited \S+ s for a CPU in the last (\S+) s"
    found = re.match(pattern, kill["why"])
    assert found, kill
    return float(found[1]) / float(found[2])
