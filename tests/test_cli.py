"""Standalone mode: the ``circus-watchdog`` command beside a real circusd (the
demo is in test_demo.py).

Each test picks the core through CIRCUS_WATCHDOG_NO_EXTENSIONS in the
environment of the command, and checks it in ``--version`` or ``/status``.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from circus_watchdog import __version__
from support import (
    Circusd,
    Standalone,
    check_kill_latency,
    command,
    free_udp_port,
    kills,
    metric,
    wait_for,
    wait_pids,
    worker_cmd,
)

LOOP_RATE = 0.5  # seconds
MAX_COUNT = 2
TIMEOUT = LOOP_RATE * MAX_COUNT
TICK = LOOP_RATE / 10  # the default tick

Start = Callable[..., Circusd]


def timing_flags(udp: int) -> list[str]:
    return [
        *("--port", str(udp)),
        *("--loop-rate", str(LOOP_RATE)),
        *("--max-count", str(MAX_COUNT)),
    ]


def sleep_until(deadline: float) -> None:
    time.sleep(max(0.0, deadline - time.monotonic()))


# -- the command line -------------------------------------------------------


def test_version(core_tag: str) -> None:
    out = subprocess.run(
        [*command(), "--version"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    pattern = rf"circus-watchdog {re.escape(__version__)} core={core_tag} "
    pattern += r"loop=(uvloop|asyncio)"
    assert re.fullmatch(pattern, out.stdout.strip()), out.stdout


def run_command(*flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*command(), *flags], capture_output=True, text=True, timeout=30
    )


def one_line_error(out: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a failed start, without its prefix."""
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("circus-watchdog: error: "), lines[0]
    return lines[0].removeprefix("circus-watchdog: error: ")


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--loop-rate", "abc"], "invalid loop_rate (--loop-rate)"),
        (["--watchers-regex", "(web"], "invalid watchers_regex (--watchers-regex)"),
        (["--msg-regex", "^(.*);(.*)$"], "invalid msg_regex (--msg-regex)"),
        (["--port", "70000"], "invalid port (--port)"),
        (["--lop-rate", "1"], "unrecognized arguments: --lop-rate"),
        (["--loop-rat", "5"], "unrecognized arguments: --loop-rat 5"),  # no abbrev
        (["--loop-rate"], "argument --loop-rate/: expected one argument"),
        (["--endpoint", "bogus://x"], "invalid endpoint (--endpoint)"),
        (["--endpoint", "tcp://nohost"], "invalid endpoint (--endpoint)"),
        (["--endpoint", "tcp://127.0.0.1"], "invalid endpoint (--endpoint)"),
        (["--endpoint", "ipc://"], "invalid endpoint (--endpoint)"),
        (["--pubsub", "bogus://x"], "invalid pubsub_endpoint (--pubsub)"),
        (["--log-output", "/nonexistent/d/wd.log"], "invalid log_output"),
        (["--log-level", "loud"], "invalid log_level (--log-level)"),
        (["--diagnostic-command", "dump {foo}"], "invalid diagnostic_command"),
        (["--circus-ini", "/nonexistent/circus.ini"], "invalid --circus-ini"),
        (["--section", "watchdog"], "invalid --section 'watchdog'"),
    ],
)
def test_wrong_option_exits_2_naming_it(
    core_tag: str, flags: list[str], named: str
) -> None:
    out = run_command(*flags)
    assert out.returncode == 2, out.stderr
    message = one_line_error(out)
    assert message.startswith(named.replace("/", ""))
    assert message.endswith(" (see --help)")
    if flags[1:]:
        assert repr(flags[-1]) in message or flags[-1] in message  # the value
    assert out.stdout == ""


def test_help_exits_0() -> None:
    out = run_command("--help")
    assert out.returncode == 0 and out.stderr == ""
    assert "--metrics-host" in out.stdout and "--section" in out.stdout


def test_port_taken_exits_1_naming_it(core_tag: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        # circusd need not be up: the socket is bound first.
        out = run_command("--port", str(port), "--endpoint", "tcp://127.0.0.1:1")
    assert out.returncode == 1
    # One line, as in plugin mode: no "[Errno 98]" in front.
    assert one_line_error(out) == (
        f"cannot bind the heartbeat socket to ip 127.0.0.1 port {port}: "
        "Address already in use"
    )


def test_metrics_host_not_on_this_host_is_named(core_tag: str) -> None:
    out = run_command(
        *("--metrics-host", "192.0.2.1", "--metrics-port", "9"),  # TEST-NET-1
        *("--port", str(free_udp_port()), "--check"),
    )
    assert out.returncode == 1
    assert one_line_error(out) == (
        "metrics_host: cannot listen on 192.0.2.1:9: Cannot assign requested address"
    )


def test_check_binds_and_releases(tmp_path: Path) -> None:
    """--check binds what the daemon would, says which one fails, holds none."""
    sock = tmp_path / "wd.sock"
    udp = free_udp_port()
    flags = ("--check", "--port", str(udp), "--unix-socket", str(sock))
    out = run_command(*flags)
    assert out.returncode == 0, out.stderr
    assert "ports free" in out.stdout
    assert not sock.exists()  # released, file and all
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held:
        held.bind(("127.0.0.1", udp))  # would fail if --check still held it
    sock.write_text("a file, not a socket")
    out = run_command(*flags)
    assert out.returncode == 1
    assert one_line_error(out) == (
        f"cannot bind unix_socket {sock}: Address already in use"
    )


def test_ini_warnings_logged_in_log_format(tmp_path: Path) -> None:
    """Standalone, a warning about the circus.ini goes to log_output in the log's
    line format, once logging is set up; not to stderr as a bare WARNING."""
    ini = tmp_path / "circus.ini"
    ini.write_text(
        "[plugin:watchdog]\nuse = circus_watchdog.plugin.WatchDog\nloop_rat = 5\n"
        f"port = {free_udp_port()}\n"
    )
    log = tmp_path / "wd.log"
    out = run_command("--check", "--circus-ini", str(ini), "--log-output", str(log))
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    lines = log.read_text().splitlines()
    (line,) = [line for line in lines if "rcvbuf:" not in line]  # not the host's
    assert re.fullmatch(
        r"\S+ \S+ circus\.watchdog\[\d+\] \[WARNING\] ignoring unknown option\(s\) "
        rf"in \[plugin:watchdog\] of {re.escape(str(ini))}: "
        r"'loop_rat' \(did you mean 'loop_rate'\?\)",
        line,
    ), line


def test_metrics_port_taken_exits_1_naming_it(core_tag: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = run_command(
            *("--metrics-port", str(port), "--endpoint", "tcp://127.0.0.1:1"),
            *("--port", "0", "--unix-socket", str(tmp_path / "wd.sock")),
            *("--log-output", str(tmp_path / "wd.log")),
        )
    assert out.returncode == 1
    message = one_line_error(out)
    assert message.startswith(f"metrics_port: cannot listen on 127.0.0.1:{port}")
    # The log file has it too, as its last line.
    log = (tmp_path / "wd.log").read_text().splitlines()
    assert log[-1].endswith(message), log


# -- beside a real circusd --------------------------------------------------


def test_kills_hung_keeps_the_rest_and_follows_incr_decr(
    circusd_factory: Start,
    standalone: Callable[..., Standalone],
    tmp_path: Path,
    core_tag: str,
) -> None:
    """Hung ``hang`` is killed in time and its respawn monitored; healthy
    ``web`` and unmatched ``other`` keep their pids; incr/decr are followed;
    SIGTERM exits 0."""
    udp = free_udp_port()
    hangs = tmp_path / "hangs"
    circusd = circusd_factory(
        f"""
[watcher:web]
cmd = {worker_cmd(udp)}
numprocesses = 2

[watcher:hang]
cmd = {worker_cmd(udp, hang_after=1, hang_file=hangs)}
numprocesses = 1

[watcher:other]
cmd = {worker_cmd(udp, silent=True)}
numprocesses = 1
"""
    )
    pids = wait_pids(circusd, {"web": 2, "hang": 1, "other": 1})
    (hang,) = pids["hang"]
    watchdog = standalone(
        circusd, *timing_flags(udp), "--watchers-regex", "^(web|hang)$", core=core_tag
    )
    started = time.monotonic()
    expected = {hang: "hang", **dict.fromkeys(pids["web"], "web")}
    wait_for(lambda: watchdog.monitored() == expected, timeout=5)
    since = time.time()
    check_kill_latency(
        circusd, "hang", hang, hangs, timeout=TIMEOUT, tick=TICK, since=since
    )
    (respawned,) = circusd.wait_for(lambda: circusd.pids("hang"), timeout=5)
    assert respawned != hang
    wait_for(lambda: watchdog.monitored().get(respawned) == "hang", timeout=5)

    def web_in_step(count: int) -> bool:
        web = circusd.pids("web")
        status = watchdog.monitored()
        gauge = metric(watchdog.metrics(), "monitored_pids")
        in_status = {pid for pid, name in status.items() if name == "web"}
        return len(web) == count and in_status == set(web) and gauge == len(status)

    circusd.call("incr", name="web")
    wait_for(lambda: web_in_step(3), timeout=5)
    grown = set(circusd.pids("web"))
    circusd.call("decr", name="web")
    wait_for(lambda: web_in_step(2), timeout=5)
    (dropped,) = grown - set(circusd.pids("web"))
    assert dropped not in watchdog.monitored()

    # Several timeouts on, the healthy and the unmatched are untouched.
    sleep_until(started + 3 * TIMEOUT)
    assert set(circusd.pids("web")) == grown - {dropped}
    assert set(pids["web"]) <= grown
    assert circusd.pids("other") == pids["other"]
    assert set(kills(watchdog.metrics())) == {"hang"}

    assert watchdog.stop(signal.SIGTERM) == 0
    assert "watchdog stopped" in watchdog.tail()


def test_circusd_restart(
    circusd_factory: Start,
    standalone: Callable[..., Standalone],
    core_tag: str,
) -> None:
    """circusd SIGKILLed and started again on the same ports: the watchdog
    reconnects, re-syncs, kills nobody healthy and still kills the hung;
    SIGINT exits 0."""
    udp = free_udp_port()
    circusd = circusd_factory(
        f"""
[watcher:web]
cmd = {worker_cmd(udp)}
numprocesses = 2

[watcher:hang]
cmd = {worker_cmd(udp, hang_after=1)}
numprocesses = 1
"""
    )
    pids = wait_pids(circusd, {"web": 2, "hang": 1})
    watchdog = standalone(circusd, *timing_flags(udp), core=core_tag)
    expected = {pids["hang"][0]: "hang", **dict.fromkeys(pids["web"], "web")}
    wait_for(lambda: watchdog.monitored() == expected, timeout=5)

    circusd.kill()
    wait_for(lambda: not watchdog.status()["connected"], timeout=5)
    resyncs = metric(watchdog.metrics(), "resyncs_total")
    circusd.restart()
    restarted = time.monotonic()
    pids = wait_pids(circusd, {"web": 2, "hang": 1})
    assert not set(pids["web"]) & set(expected)

    def resynced() -> bool:
        status = watchdog.status()
        web = {pid for pid, name in watchdog.monitored().items() if name == "web"}
        return status["connected"] and web == set(pids["web"])

    wait_for(resynced, timeout=10)
    assert metric(watchdog.metrics(), "resyncs_total") > resyncs
    hang_kills = kills(watchdog.metrics()).get("hang", 0)
    # Still at work: the new hung process dies...
    wait_for(lambda: kills(watchdog.metrics()).get("hang", 0) > hang_kills, 10)
    # ...and, several timeouts after the restart, the healthy live on.
    sleep_until(restarted + 3 * TIMEOUT)
    assert circusd.pids("web") == pids["web"]
    assert "web" not in kills(watchdog.metrics())

    assert watchdog.stop(signal.SIGINT) == 0
    assert "watchdog stopped" in watchdog.tail()


def test_stall_guard(
    circusd_factory: Start,
    standalone: Callable[..., Standalone],
    core_tag: str,
) -> None:
    """The watchdog SIGSTOPped for twice the timeout, then SIGCONTed: its
    silence is its own, so nobody healthy is killed.

    Its workers are stopped with it, as in a paused VM, and resumed half a
    timeout after it: so its first, late, tick finds them all silent and only
    the stall guard saves them (had they run on, the heartbeats queued in the
    meantime might have been read before that tick).
    """
    udp = free_udp_port()
    circusd = circusd_factory(
        f"""
[watcher:web]
cmd = {worker_cmd(udp)}
numprocesses = 3
"""
    )
    web = wait_pids(circusd, {"web": 3})["web"]
    # No storm guard: it would hold these kills too, and hide a missing stall guard.
    flags = [*timing_flags(udp), "--no-storm-guard"]
    watchdog = standalone(circusd, *flags, core=core_tag)
    wait_for(lambda: set(watchdog.monitored()) == set(web), timeout=5)

    frozen = [watchdog.proc.pid, *web]
    try:
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        time.sleep(2 * TIMEOUT)
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
            if pid == watchdog.proc.pid:
                time.sleep(TIMEOUT / 2)
    sleep_until(time.monotonic() + 1.2 * TIMEOUT)
    series = watchdog.metrics()
    assert metric(series, "stalls_total") > 0
    assert not kills(series)
    assert circusd.pids("web") == web
    assert set(watchdog.monitored()) == set(web)


def test_dry_run_kills_nothing(
    circusd_factory: Start,
    standalone: Callable[..., Standalone],
    core_tag: str,
) -> None:
    """``--dry-run``: the hung process is counted (again each timeout), kept."""
    udp = free_udp_port()
    circusd = circusd_factory(
        f"""
[watcher:web]
cmd = {worker_cmd(udp)}
numprocesses = 1

[watcher:hang]
cmd = {worker_cmd(udp, hang_after=0.2)}
numprocesses = 1
"""
    )
    pids = wait_pids(circusd, {"web": 1, "hang": 1})
    watchdog = standalone(circusd, *timing_flags(udp), "--dry-run", core=core_tag)
    assert watchdog.status()["dry_run"] is True
    wait_for(lambda: metric(watchdog.metrics(), "would_kill_total") >= 2, 5 * TIMEOUT)
    assert not kills(watchdog.metrics())
    assert circusd.pids("hang") == pids["hang"]
    assert circusd.pids("web") == pids["web"]
    assert watchdog.stop(signal.SIGTERM) == 0


# -- packaging -------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def pyproject() -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    path = ROOT / "pyproject.toml"
    if not path.exists():  # tests copied beside an installed wheel
        pytest.skip("no pyproject.toml beside the tests")
    data: dict[str, Any] = tomllib.loads(path.read_text())
    return data


def test_license_is_shipped() -> None:
    project = pyproject()["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n")
    assert "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_wheel_test_requirements_follow_the_test_extra() -> None:
    """Where atheris has no wheel, cibuildwheel installs the same test
    requirements without it."""
    data = pyproject()
    extra = [
        req.split(";")[0].strip()
        for req in data["project"]["optional-dependencies"]["test"]
        if not req.startswith("atheris")
    ]
    (override,) = data["tool"]["cibuildwheel"]["overrides"]
    assert override["test-requires"] == extra
    assert data["tool"]["cibuildwheel"]["test-extras"] == ["test"]
