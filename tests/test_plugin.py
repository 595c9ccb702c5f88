"""Plugin mode: circusd runs ``use = circus_watchdog.plugin.WatchDog``.

Real circusd, real heartbeating processes (circus_watchdog.demo_worker), real
UDP on loopback. The core is picked through the environment circusd passes to
the plugin (CIRCUS_WATCHDOG_NO_EXTENSIONS), and checked in ``/status``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from support import (
    Circusd,
    check_kill_latency,
    fetch_metrics,
    fetch_status,
    free_port,
    free_udp_port,
    hang_times,
    kills,
    metric,
    process_gone,
    use_core,
    wait_for,
    wait_pids,
    worker_cmd,
)

LOOP_RATE = 0.5  # seconds
MAX_COUNT = 2
TIMEOUT = LOOP_RATE * MAX_COUNT
TICK = LOOP_RATE / 10  # the default tick
EXIT_BOUND = 5.0  # seconds for the plugin to exit after circusd does
PLUGIN = "plugin:watchdog"

Start = Callable[..., Circusd]


@pytest.fixture
def core_tag(core_module: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """circusd, and so the plugin, run with this core ("c" or "py")."""
    use_core(monkeypatch, core_module.is_pure_python)
    return str(core_module.tag)


@pytest.fixture
def circus_log(tmp_path: Path) -> Iterator[Path]:
    """circusd's and the plugin's log (printed at teardown: shown on failure)."""
    log = tmp_path / "circus.log"
    yield log
    if log.exists():
        print(log.read_text(errors="replace")[-6000:])


def start(circusd_factory: Start, log: Path, sections: str) -> Circusd:
    # The plugin logs where circusd does (circus passes --log-output on).
    return circusd_factory(sections, extra_circus_options=f"logoutput = {log}")


def plugin_section(udp: int, metrics: int, options: str = "") -> str:
    return f"""
[plugin:watchdog]
use = circus_watchdog.plugin.WatchDog
loop_rate = {LOOP_RATE}
max_count = {MAX_COUNT}
port = {udp}
metrics_port = {metrics}
{options}
"""


def wait_status(circusd: Circusd, port: int, core_tag: str) -> dict[str, Any]:
    status = circusd.wait_for(lambda: fetch_status(port), timeout=15)
    assert status is not None  # wait_for returns only a truthy value
    assert f" core={core_tag} " in status["version"]
    return status


def monitored(port: int) -> dict[int, str]:
    status = fetch_status(port)
    assert status is not None
    return {row["pid"]: row["watcher"] for row in status["pids"]}


# An ini written for circus's own WatchDog: a quoted watchers_regex and a custom
# msg_regex with backslashes, double-quoted so that circus's shlex keeps them
# (docs/configuration.md, "Quoting in circus.ini").
TEMPLATE = "hb pid={pid} t={timestamp}"
COMPAT_OPTIONS = r"""
watchers_regex = "^(web|api)$"
msg_regex = "^hb pid=(?P<pid>\d+) t=(?P<timestamp>\S+)$"
"""


def compat_sections(tmp_path: Path, use: str, udp: int, metrics: int) -> str:
    """Watchers web (2, healthy), api (1, hangs after 1 s) and other (1, silent
    and unmatched); metrics_port is ours, and the original ignores it."""
    hangs = tmp_path / "hangs"
    api = worker_cmd(udp, template=TEMPLATE, hang_after=1, hang_file=hangs)
    return f"""
[watcher:web]
cmd = {worker_cmd(udp, template=TEMPLATE)}
numprocesses = 2

[watcher:api]
cmd = {api}
numprocesses = 1

[watcher:other]
cmd = {worker_cmd(udp, silent=True)}
numprocesses = 1

[plugin:watchdog]
use = {use}
loop_rate = {LOOP_RATE}
max_count = {MAX_COUNT}
port = {udp}
metrics_port = {metrics}
{COMPAT_OPTIONS}"""


def test_original_runs_the_compat_ini(
    circusd_factory: Start, circus_log: Path, tmp_path: Path
) -> None:
    """The ini of the next test works with circus's own WatchDog (the premise)."""
    udp, port = free_udp_port(), free_port()
    sections = compat_sections(tmp_path, "circus.plugins.watchdog.WatchDog", udp, port)
    circusd = start(circusd_factory, circus_log, sections)
    pids = wait_pids(circusd, {"web": 2, "api": 1, "other": 1})
    web, other, (api,) = pids["web"], pids["other"], pids["api"]
    # The original may be one loop_rate late.
    circusd.wait_for(lambda: api not in circusd.pids("api"), timeout=10 + TIMEOUT)
    assert api in hang_times(tmp_path / "hangs")
    assert circusd.pids("web") == web
    assert circusd.pids("other") == other


def test_compat_ini_only_use_changed(
    circusd_factory: Start, circus_log: Path, tmp_path: Path, core_tag: str
) -> None:
    """The same ini with only ``use`` changed: hung api is killed and respawned
    in time, healthy web and unmatched other keep their pids."""
    udp, port = free_udp_port(), free_port()
    sections = compat_sections(tmp_path, "circus_watchdog.plugin.WatchDog", udp, port)
    circusd = start(circusd_factory, circus_log, sections)
    started = time.monotonic()
    pids = wait_pids(circusd, {"web": 2, "api": 1, "other": 1})
    web, other, (api,) = pids["web"], pids["other"], pids["api"]
    wait_status(circusd, port, core_tag)
    # The quoted regex: web and api only, never other (nor the plugin).
    expected = {api: "api", **dict.fromkeys(web, "web")}
    circusd.wait_for(lambda: monitored(port) == expected, timeout=5)
    since = time.time()
    hangs = tmp_path / "hangs"
    check_kill_latency(
        circusd, "api", api, hangs, timeout=TIMEOUT, tick=TICK, since=since
    )
    # circusd respawns it (on its next check_delay sweep), and the new pid is
    # monitored through the spawn event.
    (new_api,) = circusd.wait_for(lambda: circusd.pids("api"), timeout=5)
    assert new_api != api
    circusd.wait_for(lambda: monitored(port).get(new_api) == "api", timeout=5)

    # Counted once circusd confirms the kill (it may respawn first).
    def api_kills() -> float:
        series = fetch_metrics(port)
        assert series is not None
        return metric(series, "kills_total", watcher="api")

    wait_for(lambda: api_kills() >= 1, timeout=5)
    # The custom format reached the pids: heartbeats, no malformed ones.
    series = fetch_metrics(port)
    assert series is not None
    assert metric(series, "heartbeats_total") > 0
    assert metric(series, "malformed_total") == 0

    # Several timeouts on, web and other keep their pids.
    time.sleep(max(0.0, started + 3 * TIMEOUT - time.monotonic()))
    assert circusd.pids("web") == web
    assert circusd.pids("other") == other
    series = fetch_metrics(port)
    assert series is not None
    assert metric(series, "kills_total", watcher="web") == 0
    assert metric(series, "kills_total", watcher="other") == 0


def test_match_all_never_kills_itself_and_follows_incr_decr(
    circusd_factory: Start, circus_log: Path, tmp_path: Path, core_tag: str
) -> None:
    """``watchers_regex = .*``: the plugin:watchdog watcher is
    never monitored nor killed; ``incr``/``decr`` pids are added and forgotten;
    the plugin exits cleanly, and soon, after ``quit``."""
    udp, port = free_udp_port(), free_port()
    sections = f"""
[watcher:web]
cmd = {worker_cmd(udp)}
numprocesses = 1
{plugin_section(udp, port, "watchers_regex = .*")}
"""
    circusd = start(circusd_factory, circus_log, sections)
    (plugin,) = wait_pids(circusd, {PLUGIN: 1})[PLUGIN]
    wait_status(circusd, port, core_tag)
    started = time.monotonic()

    def in_step(count: int) -> bool:
        web = circusd.pids("web")
        series = fetch_metrics(port)
        return (
            len(web) == count
            and series is not None
            and metric(series, "monitored_pids") == count
            and monitored(port) == dict.fromkeys(web, "web")
        )

    circusd.wait_for(lambda: in_step(1), timeout=5)
    before = set(circusd.pids("web"))
    circusd.call("incr", name="web", nb=2)
    circusd.wait_for(lambda: in_step(3), timeout=5)
    grown = set(circusd.pids("web"))
    assert before < grown
    circusd.call("decr", name="web")
    circusd.wait_for(lambda: in_step(2), timeout=5)
    (dropped,) = grown - set(circusd.pids("web"))
    assert dropped not in monitored(port)

    web = circusd.pids("web")
    time.sleep(max(0.0, started + 3 * TIMEOUT - time.monotonic()))
    assert circusd.pids(PLUGIN) == [plugin]
    assert circusd.pids("web") == web
    series = fetch_metrics(port)
    assert series is not None
    assert kills(series) == {}
    assert metric(series, "kills_total", watcher="web") == 0  # there, at 0

    circusd.call("quit")
    wait_for(lambda: process_gone(plugin), timeout=EXIT_BOUND)
    wait_for(lambda: "watchdog stopped" in circus_log.read_text(), timeout=2)
    circusd.proc.wait(EXIT_BOUND)


def test_plugin_exits_when_circusd_is_killed(
    circusd_factory: Start, circus_log: Path, core_tag: str
) -> None:
    """circusd SIGKILLed: the plugin notices within seconds and exits."""
    udp, port = free_udp_port(), free_port()
    # The default loop_rate (60): the tick that checks the parent is 1 s.
    sections = f"""
[watcher:web]
cmd = {worker_cmd(udp)}
numprocesses = 1

[plugin:watchdog]
use = circus_watchdog.plugin.WatchDog
port = {udp}
metrics_port = {port}
"""
    circusd = start(circusd_factory, circus_log, sections)
    (plugin,) = wait_pids(circusd, {PLUGIN: 1})[PLUGIN]
    wait_status(circusd, port, core_tag)
    circusd_pid = circusd.proc.pid
    circusd.kill()
    wait_for(lambda: process_gone(plugin), timeout=EXIT_BOUND)
    text = circus_log.read_text()
    assert f"circusd (pid {circusd_pid}) is gone: exiting" in text


# -- a plugin that cannot start (fast, in-process; tests/test_plugin_startup.py
# runs it on real circusds) ---------------------------------------------------


@pytest.fixture
def idle_plugin(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A WatchDog with a bad option, repeating its error every 0.1 s, logging
    through pytest's handlers (not where a circusd would be)."""
    from circus_watchdog import logs, plugin

    monkeypatch.setattr(plugin, "REPEAT_EVERY", 0.1)
    monkeypatch.setattr(plugin, "PARENT_CHECK", 0.01)
    monkeypatch.setattr(logs, "configure_plugin_default", lambda: None)
    monkeypatch.setattr(logs, "configure", lambda config, plugin: None)
    return plugin.WatchDog("tcp://127.0.0.1:1", "tcp://127.0.0.1:2", 1.0, max_count="0")


def start_in_thread(target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def reports(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


def test_cannot_start_repeats_its_error_until_stopped(
    idle_plugin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    thread = start_in_thread(idle_plugin.start)
    wait_for(lambda: len(reports(caplog)) >= 3, timeout=10)
    assert idle_plugin.running
    idle_plugin.stop()
    thread.join(5)
    assert not thread.is_alive()
    assert not idle_plugin.running
    expected = (
        "circus-watchdog cannot start: invalid max_count (--max-count): expected "
        "an integer >= 1, got '0'; nothing is watched (repeated every 0.1 s until "
        "the plugin is fixed and restarted)"
    )
    assert set(reports(caplog)) == {expected}


def test_cannot_start_exits_when_circusd_is_gone(
    idle_plugin: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    thread = start_in_thread(idle_plugin.start)
    wait_for(lambda: reports(caplog), timeout=10)
    monkeypatch.setattr(os, "getppid", lambda: 1)  # re-parented: circusd died
    thread.join(5)
    assert not thread.is_alive()
