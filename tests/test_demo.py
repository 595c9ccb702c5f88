"""``circus-watchdog demo``: its screen (fast, from a /status document) and one
headless run per core on a real circusd."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from circus.config import get_config

from circus_watchdog.demo import (
    KILL_TIMEOUT,
    QUIT_TIMEOUT,
    fetch_status,
    render,
    summary,
    write_ini,
)
from circus_watchdog.metrics import Metrics, Readings, make_registry, serve_http
from support import NO_EXTENSIONS, command, process_gone, wait_for

EXIT_BOUND = 5.0  # seconds for every demo process to be gone after it ends
DURATION = 15  # seconds: the first kill comes well within it (see demo.py)


def status(**changes: Any) -> dict[str, Any]:
    """A /status document as the plugin serves it."""
    doc: dict[str, Any] = {
        "version": "circus-watchdog 9.9 core=c loop=uvloop",
        "timeout": 3.0,
        "kills": {"flaky": 9},
        "pids": [
            {"pid": 12, "watcher": "steady", "age": 0.2},
            {"pid": 11, "watcher": "flaky", "age": 3.4},
            {"pid": 10, "watcher": "flaky", "age": 2.5},
        ],
        "killing": [13],
        "heartbeats": 1234,
        "would_kill": 0,
        "kills_held": 1,
    }
    doc.update(changes)
    return doc


def test_screen_shows_kills_per_watcher() -> None:
    screen = render(status(), 20.0, 12.0, [31, 30], 9664).splitlines()
    assert screen[0].startswith("circus-watchdog demo     12s   circus-watchdog 9.9")
    assert screen[2].split() == ["timeout", "3s", "heartbeats/s", "20", "kills", "9"]
    # Every monitored watcher, by name, killed or not.
    assert screen[3:5] == ["  flaky: 9", "  steady: 0"]
    assert "{" not in "\n".join(screen)  # no Python dict
    rows = [line.split() for line in screen[6:]]
    assert rows == [
        ["watcher", "pid", "last", "heartbeat"],
        # Marked once late, with how late against the timeout; not before.
        ["flaky", "10", "2.5s"],
        ["flaky", "11", "3.4s", "late", "by", "0.4s", "(timeout", "3s)"],
        ["steady", "12", "0.2s"],
        ["(killing)", "13"],
        ["unmonitored", "30", "31", "(not", "matched:", "never", "killed)"],
    ]


def test_screen_keeps_the_hint_and_the_urls() -> None:
    """The stop hint and the metrics URL are on every screen, near the top, so
    a redraw never hides them."""
    for doc in (status(), status(kills={}, pids=[], killing=[])):
        screen = render(doc, 0.0, 1.0, None, 4321).splitlines()
        assert screen[1] == (
            "Ctrl-C to stop   metrics http://127.0.0.1:4321/metrics  (and /status)"
        )
        assert max(map(len, screen)) <= 80  # fits a terminal
    quiet = render(status(kills={}, pids=[], killing=[]), 0.0, 1.0, None, 4321)
    assert "kills 0\n\n" in quiet
    assert quiet.endswith("unmonitored  ?  (not matched: never killed)")


def test_summary_line() -> None:
    assert summary(status(kills={"flaky": 9, "gone": 1})) == (
        "demo summary: 10 kill(s) (flaky: 9, gone: 1, steady: 0), "
        "1234 heartbeats, 0 dry-run, 1 held"
    )


def test_status_is_read_without_a_proxy(
    monkeypatch: pytest.MonkeyPatch,
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """A proxy set in the environment (as on many company desktops) is not
    used to reach the plugin on loopback."""
    for name in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as dead:  # a proxy that refuses every connection
        dead.bind(("127.0.0.1", 0))
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{dead.getsockname()[1]}")
        got: list[dict[str, Any] | None] = []

        async def main() -> None:
            registry = make_registry(
                Metrics(), lambda: Readings(0, True, (), 0, 0, 0), {}
            )
            server = await serve_http("127.0.0.1", 0, registry, status)
            port = server.sockets[0].getsockname()[1]
            try:
                reply = asyncio.to_thread(fetch_status, port)
                got.append(await asyncio.wait_for(reply, 10))
            finally:
                server.close()
                await server.wait_closed()

        loop = loop_factory()
        try:
            loop.run_until_complete(main())
        finally:
            loop.close()
    assert got == [status()]


def test_ini_starts_no_circusd_stats(tmp_path: Path) -> None:
    """circus 0.19 starts circusd-stats whenever stats_endpoint is set, even
    with statsd = False: the demo's circus.ini, read by circus, does not."""
    ini, _, _ = write_ini(tmp_path)
    assert get_config(str(ini))["statsd"] is False


# -- a real run -------------------------------------------------------------


@dataclass
class Demo:
    """One ``circus-watchdog demo`` run and every process it was seen to start."""

    core: str
    proc: subprocess.Popen[bytes]
    seen: set[psutil.Process]


def screens(text: str) -> list[str]:
    """The screens a ``--plain`` run printed (each starts with the title)."""
    pattern = r"^circus-watchdog demo .*?(?=\n\n(?:circus|demo summary))"
    return re.findall(pattern, text, re.MULTILINE | re.DOTALL)


def check_screens(text: str) -> None:
    """At least one kill, and every screen with the hint, the metrics URL and
    kills as ``watcher: N`` lines (never a Python dict)."""
    match = re.search(
        r"^demo summary: (\d+) kill\(s\) \(flaky: (\d+), steady: 0\), ",
        text,
        re.MULTILINE,
    )
    assert match, text
    assert int(match[1]) == int(match[2]) >= 1, text
    shown = screens(text)
    assert len(shown) >= 3, text  # one every 2 s once the plugin answers
    for screen in shown:
        lines = screen.splitlines()
        assert re.fullmatch(
            r"Ctrl-C to stop   metrics http://127\.0\.0\.1:\d+/metrics"
            r"  \(and /status\)",
            lines[1],
        ), screen
        kill_lines = lines[3 : lines.index("")]
        assert all(re.fullmatch(r"  \w+: \d+", k) for k in kill_lines), screen
        assert "{" not in screen
    # The last screen came up to 2 s before the summary: as many kills or fewer.
    flaky, steady = shown[-1].splitlines()[3:5]
    assert steady == "  steady: 0", shown[-1]
    assert flaky.startswith("  flaky: ") and int(flaky[9:]) <= int(match[2])


@pytest.mark.circusd
def test_demo(request: pytest.FixtureRequest) -> None:
    """``circus-watchdog demo --duration 15 --plain`` kills at least one hung
    process, shows kills as ``watcher: N`` lines with the stop hint and the
    metrics URL on every screen, and leaves no process nor temporary folder
    behind.

    One demo per core, side by side: a run takes the whole 15 s.
    """
    cores = ["c", "py"] if request.config.getoption("--c-extensions") else ["py"]
    demos: list[Demo] = []
    for core in cores:
        env = {k: v for k, v in os.environ.items() if k != NO_EXTENSIONS}
        if core == "py":
            env[NO_EXTENSIONS] = "1"
        proc = subprocess.Popen(
            [*command(), "demo", "--duration", str(DURATION), "--plain"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        demos.append(Demo(core, proc, set()))
    done = threading.Event()

    def spy() -> None:
        # Every process the demos start (circusd, its plugin, the fleet).
        while not done.is_set():
            for demo in demos:
                try:
                    demo.seen.update(psutil.Process(demo.proc.pid).children(True))
                except psutil.NoSuchProcess:
                    pass
            done.wait(0.2)

    spy_thread = threading.Thread(target=spy, daemon=True)
    spy_thread.start()
    outputs = []
    try:
        for demo in demos:
            out, _ = demo.proc.communicate(timeout=4 * DURATION)
            outputs.append(out.decode(errors="replace"))
    finally:
        done.set()
        spy_thread.join(5)
        for demo in demos:
            if demo.proc.poll() is None:
                demo.proc.kill()
                demo.proc.wait()
        seen = [p for demo in demos for p in demo.seen]
        try:
            wait_for(lambda: all(process_gone(p.pid) for p in seen), EXIT_BOUND)
            leftovers = []
        except AssertionError:
            leftovers = [p for p in seen if not process_gone(p.pid)]
            for p in leftovers:
                p.kill()
    for demo, text in zip(demos, outputs, strict=True):
        assert demo.proc.returncode == 0, text
        # circusd, the plugin, 3 steady, 3 flaky and 2 unmonitored workers.
        assert len(demo.seen) >= 10, text
        assert f" core={demo.core} " in text
        check_screens(text)
        folder = re.search(r"^circusd started .* in (\S+);", text, re.MULTILINE)
        assert folder, text
        assert not os.path.exists(folder[1])
    assert not leftovers


@pytest.mark.circusd
def test_demo_ends_a_wedged_circusd() -> None:
    """circusd stops answering (SIGSTOP) while the plugin's kill of a hung
    worker is in flight; Ctrl-C ends the demo: ``quit`` gets no answer, so the
    demo SIGKILLs circusd's process group and every process circusd started,
    and none survives."""
    proc = subprocess.Popen(
        [*command(), "demo", "--duration", "120", "--plain"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    out = proc.stdout
    lines: list[str] = []
    reader = threading.Thread(
        target=lambda: lines.extend(line.decode(errors="replace") for line in out),
        daemon=True,
    )
    reader.start()
    seen: list[psutil.Process] = []
    try:

        def up() -> tuple[int, int] | None:
            text = "".join(lines)
            pid = re.search(r"^circusd started \(pid (\d+)\)", text, re.MULTILINE)
            port = re.search(r"metrics http://127\.0\.0\.1:(\d+)/metrics", text)
            return (int(pid[1]), int(port[1])) if pid and port else None

        circusd_pid, port = wait_for(up, 60)
        circusd = psutil.Process(circusd_pid)
        # circusd, the plugin, 3 steady, 3 flaky and 2 unmonitored workers.
        wait_for(lambda: len(circusd.children(recursive=True)) >= 9, 20)
        seen = [circusd, *circusd.children(recursive=True)]
        circusd.suspend()
        # A flaky worker hangs within 8 s and is due 3 s later: the plugin's
        # kill then waits on the stopped circusd.
        assert wait_for(lambda: (fetch_status(port) or {}).get("killing"), 30)
        proc.send_signal(signal.SIGINT)
        proc.wait(2 * QUIT_TIMEOUT + 2 * KILL_TIMEOUT + 10)
        reader.join(5)
        assert "circusd did not quit within" in "".join(lines), lines
        wait_for(lambda: all(process_gone(p.pid) for p in seen), EXIT_BOUND)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(5)
        out.close()
        for p in seen:
            if not process_gone(p.pid):
                p.kill()
