"""Fault tests of the guards, on a real circusd with real processes:
authenticated heartbeats over the Unix socket, a flood of forged pids, stale
timestamps, escalation, grace and per-watcher timeouts.

Each runs the standalone ``circus-watchdog`` on both cores (the ``core_tag``
fixture sets CIRCUS_WATCHDOG_NO_EXTENSIONS for the command).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

import circus_watchdog.loadgen.__main__ as loadgen
from support import (
    SLEEPER,
    Circusd,
    Standalone,
    free_udp_port,
    kills,
    metric,
    wait_for,
    wait_pids,
    worker_cmd,
)

Start = Callable[..., Circusd]
LOOP_RATE = 0.5  # seconds
MAX_COUNT = 2
TIMEOUT = LOOP_RATE * MAX_COUNT
SLACK = 2.0  # seconds for the kill round trip and circusd's bookkeeping


def python_cmd(*lines: str) -> str:
    """A watcher ``cmd`` running ``lines`` (one ini line, so joined with ``;``);
    the code must exit when circusd is gone."""
    return shlex.join([sys.executable, "-c", "; ".join(lines)])


# Sends WATCHDOG=1 with the sdnotify library, as an unchanged sd_notify client.
SDNOTIFY = python_cmd(
    "import os, time, sdnotify",
    "n = sdnotify.SystemdNotifier()",
    "p = os.getppid()",
    "any(os.getppid() != p or n.notify('WATCHDOG=1') or time.sleep(0.1)"
    " for _ in range(6000))",
)


def flags(*more: str) -> list[str]:
    return ["--loop-rate", str(LOOP_RATE), "--max-count", str(MAX_COUNT), *more]


def test_unix_socket_authenticates_heartbeats(
    circusd_factory: Start,
    standalone: Callable[..., Standalone],
    core_tag: str,
    tmp_path: Path,
) -> None:
    path = tmp_path / "notify.sock"
    circusd = circusd_factory(
        f"[watcher:notifier]\ncmd = {SDNOTIFY}\nnumprocesses = 2\nautostart = false\n\n"
        f"[env:notifier]\nNOTIFY_SOCKET = {path}\n\n"
        f"[watcher:hung]\ncmd = {SLEEPER}\nnumprocesses = 1\n"
    )
    wait_pids(circusd, {"hung": 1})
    wd = standalone(
        circusd, *flags("--unix-socket", str(path), "--port", "0"), core=core_tag
    )
    # sdnotify connects once, when created: start its users once the socket is up.
    circusd.call("start", name="notifier")
    pids = wait_pids(circusd, {"notifier": 2, "hung": 1})
    hung = pids["hung"][0]
    # This test forges heartbeats for the hung pid, in every way it can.
    forged = [b"WATCHDOG=1\nMAINPID=%d" % hung, b"%d;%.3f" % (hung, time.time())]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as forger:
        forger.setblocking(False)
        deadline = time.monotonic() + TIMEOUT + SLACK + 3
        while hung in circusd.pids("hung") and time.monotonic() < deadline:
            for payload in forged:
                with contextlib.suppress(BlockingIOError):
                    forger.sendto(payload, str(path))
            time.sleep(0.05)
    assert hung not in circusd.pids("hung"), wd.tail()
    time.sleep(2 * TIMEOUT)  # the sd_notify clients stay alive meanwhile
    assert sorted(circusd.pids("notifier")) == sorted(pids["notifier"]), wd.tail()
    series = wd.metrics()
    assert metric(series, "heartbeats_total") > 0
    assert metric(series, "unknown_pid_total") > 0  # the forger's own pid
    assert set(kills(series)) == {"hung"}  # and its respawns: they hang too


def test_forged_flood_keeps_memory_and_processes(
    circusd_factory: Start,
    standalone: Callable[..., Standalone],
    core_tag: str,
) -> None:
    udp = free_udp_port()
    circusd = circusd_factory(
        f"[watcher:web]\ncmd = {worker_cmd(udp, interval=0.1)}\nnumprocesses = 3\n"
    )
    web = wait_pids(circusd, {"web": 3})["web"]
    # A small buffer, so that the flood also makes the kernel drop heartbeats:
    # the kernel-drop guard must then keep everyone alive.
    wd = standalone(
        circusd, *flags("--port", str(udp), "--rcvbuf", "256K"), core=core_tag
    )
    wait_for(lambda: len(wd.monitored()) == 3, timeout=5)
    time.sleep(1)
    before = psutil.Process(wd.proc.pid).memory_info().rss
    out = io.StringIO()
    # Freeze the watchdog for a second of the flood, so the kernel must drop
    # (a fast core may otherwise keep up even with the small buffer).
    timers = [
        threading.Timer(1.0, os.kill, (wd.proc.pid, signal.SIGSTOP)),
        threading.Timer(2.0, os.kill, (wd.proc.pid, signal.SIGCONT)),
    ]
    for timer in timers:
        timer.start()
    with contextlib.redirect_stdout(out):
        code = loadgen.main(
            [
                *("--target", f"127.0.0.1:{udp}"),
                *("--pids", "1000000", "--pid-base", "4000000"),
                *("--count", "1000000", "--rate", "250000", "--duration", "20"),
                "--json",
            ]
        )
    for timer in timers:
        timer.join()
    os.kill(wd.proc.pid, signal.SIGCONT)  # whatever the timers managed
    assert code == 0
    sent = json.loads(out.getvalue())["sent"]
    assert sent == 1_000_000

    def settled() -> float | None:  # the workers' heartbeats go on meanwhile
        first = metric(wd.metrics(), "unknown_pid_total")
        time.sleep(0.5)
        return first if metric(wd.metrics(), "unknown_pid_total") == first else None

    wait_for(settled, timeout=30)
    after = psutil.Process(wd.proc.pid).memory_info().rss
    series = wd.metrics()
    assert after - before < 5 * 2**20, (before, after)
    assert metric(series, "unknown_pid_total") > 100_000
    assert metric(series, "kernel_drops_total") > 0
    assert metric(series, "monitored_pids") == 3
    time.sleep(2 * TIMEOUT)
    assert sorted(circusd.pids("web")) == sorted(web), wd.tail()
    assert kills(wd.metrics()) == {}


def test_stale_heartbeats_do_not_count(
    circusd_factory: Start,
    standalone: Callable[..., Standalone],
    core_tag: str,
) -> None:
    udp = free_udp_port()
    replayed = worker_cmd(udp, interval=0.1, template="{pid};1000.0")
    circusd = circusd_factory(
        f"[watcher:fresh]\ncmd = {worker_cmd(udp, interval=0.1)}\nnumprocesses = 1\n\n"
        f"[watcher:replayed]\ncmd = {replayed}\nnumprocesses = 1\n"
    )
    pids = wait_pids(circusd, {"fresh": 1, "replayed": 1})
    wd = standalone(
        circusd, *flags("--port", str(udp), "--max-age", "30"), core=core_tag
    )
    replayed_pid = pids["replayed"][0]
    circusd.wait_for(
        lambda: replayed_pid not in circusd.pids("replayed"), TIMEOUT + SLACK + 3
    )
    assert circusd.pids("fresh") == pids["fresh"]
    series = wait_for(lambda: kills(wd.metrics()) and wd.metrics(), timeout=3)
    assert metric(series, "stale_total") > 0
    assert set(kills(series)) == {"replayed"}


def test_escalation_grace_and_watcher_timeouts(
    circusd_factory: Start,
    standalone: Callable[..., Standalone],
    core_tag: str,
    tmp_path: Path,
) -> None:
    udp = free_udp_port()
    signals = tmp_path / "signals"
    # Records SIGUSR1 (the diagnostic signal) and never heartbeats.
    hung = python_cmd(
        "import os, signal, time",
        "signal.signal(signal.SIGUSR1, lambda *_: "
        f"open({str(signals)!r}, 'a').write(str(os.getpid()) + ' '))",
        "p = os.getppid()",
        "any(os.getppid() != p or time.sleep(0.1) for _ in range(6000))",
    )
    # Starts heartbeating after 2 s, longer than the 1 s timeout: needs grace.
    slow = python_cmd(
        "import time, runpy, sys",
        "time.sleep(2)",
        f"sys.argv = ['w', '--address', '127.0.0.1:{udp}', '--interval', '0.1']",
        "runpy.run_module('circus_watchdog.demo_worker', run_name='__main__')",
    )
    circusd = circusd_factory(
        f"[watcher:hung]\ncmd = {hung}\nnumprocesses = 1\n\n"
        f"[watcher:batch]\ncmd = {SLEEPER}\nnumprocesses = 1\n"
    )
    pids = wait_pids(circusd, {"hung": 1, "batch": 1})
    wd = standalone(
        circusd,
        *flags("--port", str(udp)),
        *("--diagnostic-signal", "USR1", "--diagnostic-delay", "0.5"),
        *("--grace", "5", "--watcher-timeouts", "^batch=60"),
        core=core_tag,
    )
    # A watcher added now: its process is spawned while the watchdog runs.
    circusd.call("add", name="slow", cmd=slow, start=True)
    slow_pid = wait_pids(circusd, {"slow": 1})["slow"][0]
    hung_pid = pids["hung"][0]
    circusd.wait_for(lambda: hung_pid not in circusd.pids("hung"), TIMEOUT + SLACK + 3)
    # Signalled, then killed (its respawn, hung too, may have been signalled).
    assert signals.read_text().split()[0] == str(hung_pid)
    time.sleep(4)  # slow has started beating within its grace
    assert circusd.pids("slow") == [slow_pid], wd.tail()
    assert circusd.pids("batch") == pids["batch"]  # its own 60 s timeout
    assert set(kills(wd.metrics())) == {"hung"}


def test_kill_failure_is_counted(
    circusd_factory: Start,
    standalone: Callable[..., Standalone],
    core_tag: str,
) -> None:
    udp = free_udp_port()
    circusd = circusd_factory(
        f"[watcher:web]\ncmd = {worker_cmd(udp, interval=0.1)}\nnumprocesses = 2\n\n"
        f"[watcher:hung]\ncmd = {SLEEPER}\nnumprocesses = 1\n"
    )
    hung = wait_pids(circusd, {"web": 2, "hung": 1})["hung"][0]
    # SIGWINCH is ignored by default: it only opens a window before the kill.
    wd = standalone(
        circusd,
        *flags("--port", str(udp)),
        *("--diagnostic-signal", "WINCH", "--diagnostic-delay", "3"),
        *("--watchers-graceful-timeout", "1"),  # checked for 1 s + 1 s
        core=core_tag,
    )
    wait_for(lambda: hung in wd.status()["killing"], timeout=TIMEOUT + SLACK + 3)
    # Meanwhile someone else has circusd stop it gently, with a signal it
    # ignores: circusd then answers the watchdog's kill "ok" without killing
    # (the process is already stopping), and the watchdog must notice.
    circusctl = Path(sys.executable).with_name("circusctl")
    other = subprocess.Popen(
        [str(circusctl), "--endpoint", circusd.endpoint, "--timeout", "30"]
        + ["kill", "hung", str(hung), "--signum", "WINCH", "--graceful_timeout", "20"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        series = wait_for(
            lambda: metric(wd.metrics(), "kill_failures_total") and wd.metrics(),
            timeout=15,
        )
    finally:
        other.kill()
        other.wait()
    assert metric(series, "kill_failures_total") == 1
    assert kills(series) == {}
    assert "still runs after the kill" in wd.tail()
