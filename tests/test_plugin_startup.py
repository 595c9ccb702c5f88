"""A plugin that cannot start says so where circusd's own log goes.

One real circusd per way operators run it: foreground with default logging
(its stderr), ``circusd --log-output FILE``, ``[circus] logoutput = FILE`` and
``circusd --daemon``. Each gets a bad option or a taken port; the error must be
one line naming the option and its value in circusd's log, and the plugin must
not be respawned in a loop (circusd would restart an exited plugin every
check_delay). Then: the plugin's log is visible by default, and its
``log_output`` option is honoured.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from circus.client import CircusClient

from support import (
    STOP_TIMEOUT,
    Circusd,
    free_ports,
    free_udp_port,
    wait_for,
)

CHECK_DELAY = 1  # seconds: circusd would respawn a dead plugin this often
NO_RESPAWN_FOR = 3 * CHECK_DELAY  # seconds watched for a respawn
PLUGIN = "plugin:watchdog"
ERROR = "circus-watchdog cannot start: "
DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


@dataclass
class Launched:
    """A circusd started with command-line flags (``--daemon`` included)."""

    workdir: Path
    endpoint: str
    proc: subprocess.Popen[bytes]
    pidfile: Path | None

    @property
    def pid(self) -> int:
        if self.pidfile is None:
            return self.proc.pid
        return int(self.pidfile.read_text().strip())

    def call(self, command: str, **props: Any) -> Any:
        client = CircusClient(endpoint=self.endpoint, timeout=2.0)
        try:
            return client.send_message(command, **props)
        finally:
            client.stop()

    def plugin_pids(self) -> list[int]:
        reply = self.call("list", name=PLUGIN)
        return sorted(reply.get("pids", []))

    def stop(self) -> None:
        """quit through the endpoint; SIGKILL circusd and its children if need be."""
        try:
            circusd = psutil.Process(self.pid)
        except (OSError, ValueError, psutil.NoSuchProcess):
            return  # never started (no pidfile), or gone
        procs = [circusd, *circusd.children(recursive=True)]
        try:
            self.call("quit")
        except Exception:  # noqa: BLE001 - the kill below is the fallback
            pass
        _, alive = psutil.wait_procs(procs, timeout=STOP_TIMEOUT)
        for proc in alive:
            proc.kill()
        psutil.wait_procs(alive, timeout=STOP_TIMEOUT)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)


Launch = Callable[..., Launched]


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launch]:
    """``launch(sections, *flags, circus_options="") -> Launched``, stopped at
    teardown; circusd's stdout and stderr go to ``workdir / "stderr"``."""
    started: list[Launched] = []

    def start(sections: str, *flags: str, circus_options: str = "") -> Launched:
        ctl, pub = free_ports(2)
        endpoint = f"tcp://127.0.0.1:{ctl}"
        ini = tmp_path / "circus.ini"
        ini.write_text(
            f"""\
[circus]
endpoint = {endpoint}
pubsub_endpoint = tcp://127.0.0.1:{pub}
multicast_endpoint =
statsd = False
httpd = False
check_delay = {CHECK_DELAY}
{circus_options}

{sections}
"""
        )
        pidfile = tmp_path / "circusd.pid" if "--daemon" in flags else None
        pid_flags = ("--pidfile", str(pidfile)) if pidfile is not None else ()
        with open(tmp_path / "stderr", "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "circus.circusd", *flags, *pid_flags, str(ini)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                cwd=tmp_path,
            )
        launched = Launched(tmp_path, endpoint, proc, pidfile)
        started.append(launched)
        if pidfile is not None:  # the launcher exits at once; the daemon stays
            assert proc.wait(STOP_TIMEOUT) == 0
            wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 10)
        return launched

    yield start
    for launched in started:
        launched.stop()


def plugin_section(options: str) -> str:
    return f"""
[plugin:watchdog]
use = circus_watchdog.plugin.WatchDog
watchers_regex = ^nothing$
{options}
"""


def error_lines(log: Path) -> list[str]:
    try:
        text = log.read_text(errors="replace")
    except FileNotFoundError:
        return []
    return [line for line in text.splitlines() if ERROR in line]


def check_reported_once_and_idle(
    log: Path, plugin_pids: Callable[[], list[int]], *expected: str
) -> None:
    """One line naming option and value, from a plugin that stays up."""
    (line,) = wait_for(lambda: error_lines(log), timeout=15)
    for part in expected:
        assert part in line
    (plugin,) = plugin_pids()
    assert f"circus.watchdog[{plugin}] [ERROR] " in line
    time.sleep(NO_RESPAWN_FOR)
    assert plugin_pids() == [plugin]
    assert error_lines(log) == [line]  # a respawned plugin would say it again
    assert "Traceback" not in log.read_text()


def test_foreground_default_logging(circusd_factory: Callable[..., Circusd]) -> None:
    """circusd logs to its stderr; the plugin's own stderr is /dev/null. The
    line is docs/configuration.md's example."""
    circusd = circusd_factory(plugin_section("max_count = 0"))
    check_reported_once_and_idle(
        circusd.log,
        lambda: circusd.pids(PLUGIN),
        "invalid max_count (--max-count): ",
        "got '0'",
    )
    doc = DOC.read_text()
    blocks = [b.split("```", 1)[0].strip() for b in doc.split("```text\n")[1:]]
    (example,) = [b for b in blocks if ERROR in b]
    (line,) = error_lines(circusd.log)
    assert line.split(" [ERROR] ", 1)[1] == example


@pytest.mark.circusd  # launch starts circusd itself
def test_log_output_flag(launch: Launch, tmp_path: Path) -> None:
    """``circusd --log-output FILE``: circus does not pass it to plugins."""
    log = tmp_path / "circusd.log"
    circusd = launch(plugin_section("loop_rate = -1"), "--log-output", str(log))
    check_reported_once_and_idle(
        log, circusd.plugin_pids, "invalid loop_rate (--loop-rate): ", "got '-1'"
    )


@pytest.mark.circusd  # launch starts circusd itself
def test_ini_logoutput_and_a_taken_port(launch: Launch, tmp_path: Path) -> None:
    """``[circus] logoutput = FILE``, and a runtime failure: the port is taken."""
    log = tmp_path / "circusd.log"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        circusd = launch(
            plugin_section(f"port = {port}"), circus_options=f"logoutput = {log}"
        )
        check_reported_once_and_idle(
            log,
            circusd.plugin_pids,
            f"{ERROR}cannot bind the heartbeat socket to ip 127.0.0.1 port {port}: "
            "Address already in use; nothing is watched",
        )
    # Fixed and reloaded (circus gives the new plugin no --log-output then):
    # it starts, and says so in the same log.
    ini = tmp_path / "circus.ini"
    fixed = ini.read_text().replace(f"port = {port}", f"port = {free_udp_port()}")
    ini.write_text(fixed)
    assert circusd.call("reloadconfig")["status"] == "ok"
    wait_for(lambda: "listening on udp" in log.read_text(), timeout=15)


@pytest.mark.circusd  # launch starts circusd itself
def test_daemon(launch: Launch, tmp_path: Path) -> None:
    """``circusd --daemon --log-output FILE`` (a daemon's stderr is /dev/null).
    The plugin's own log_output, good while max_count is bad, gets the line too."""
    log, own = tmp_path / "circusd.log", tmp_path / "own.log"
    section = plugin_section(f"max_count = 0\nlog_output = {own}")
    circusd = launch(section, "--daemon", "--log-output", str(log))
    check_reported_once_and_idle(
        log, circusd.plugin_pids, "invalid max_count (--max-count): ", "got '0'"
    )
    assert error_lines(own) == error_lines(log)


def test_logs_visible_by_default_and_log_output_honoured(
    circusd_factory: Callable[..., Circusd], tmp_path: Path
) -> None:
    """Plugin ``loud`` logs where circusd does; plugin ``quiet`` logs to its
    ``log_output`` file (created), and only its warnings reach circusd's log."""
    own = tmp_path / "logs" / "own.log"
    own.parent.mkdir()
    sections = f"""
[plugin:loud]
use = circus_watchdog.plugin.WatchDog
watchers_regex = ^nothing$
port = {free_udp_port()}

[plugin:quiet]
use = circus_watchdog.plugin.WatchDog
watchers_regex = ^nothing$
port = {free_udp_port()}
log_output = {own}
"""
    circusd = circusd_factory(sections)
    (loud,) = circusd.wait_for(lambda: circusd.pids("plugin:loud"), timeout=10)
    (quiet,) = circusd.wait_for(lambda: circusd.pids("plugin:quiet"), timeout=10)
    started = " [INFO] circus-watchdog "

    def lines(path: Path, pid: int) -> list[str]:
        text = path.read_text(errors="replace") if path.exists() else ""
        tag = f"circus.watchdog[{pid}]"
        return [line for line in text.splitlines() if tag in line]

    def has_started(path: Path, pid: int) -> bool:
        return any(
            started in line and "listening on" in line for line in lines(path, pid)
        )

    circusd.wait_for(lambda: has_started(circusd.log, loud), timeout=15)
    circusd.wait_for(lambda: has_started(own, quiet), timeout=15)
    assert not any("[INFO]" in line for line in lines(circusd.log, quiet))
    assert not lines(own, loud)


def test_option_warnings_reach_circusd_log(
    circusd_factory: Callable[..., Circusd],
) -> None:
    """A typo'd option, and an empty value that swallows the option after it:
    one warning each, in circusd's log (default logging), in its line format."""
    sections = f"""
[plugin:typo]
use = circus_watchdog.plugin.WatchDog
watchers_regex = ^nothing$
port = {free_udp_port()}
loop_rat = 5

[plugin:empty]
use = circus_watchdog.plugin.WatchDog
watchers_regex = ^nothing$
port = {free_udp_port()}
grace =
max_count = 5
"""
    circusd = circusd_factory(sections)
    (typo,) = circusd.wait_for(lambda: circusd.pids("plugin:typo"), timeout=10)
    (empty,) = circusd.wait_for(lambda: circusd.pids("plugin:empty"), timeout=10)

    def warnings(pid: int) -> list[str]:
        tag = f"circus.watchdog[{pid}] [WARNING] "
        text = circusd.log.read_text(errors="replace")
        found = [line.split(tag, 1)[1] for line in text.splitlines() if tag in line]
        return [w for w in found if "option" in w]  # not the pure core's, say

    circusd.wait_for(lambda: warnings(typo) and warnings(empty), timeout=15)
    assert warnings(typo) == [
        "ignoring unknown option(s) in [plugin:typo]: "
        "'loop_rat' (did you mean 'loop_rate'?)"
    ]
    assert warnings(empty) == [
        "an empty option in [plugin:empty] made circus drop the option after it "
        "(max_count): delete empty options"
    ]
