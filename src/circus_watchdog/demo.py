"""``circus-watchdog demo``: a real circusd, a small fleet, the watchdog as a
plugin, and a live view of what it sees, all on free loopback ports in a
temporary folder that is removed afterwards.

The fleet: ``steady`` processes heartbeat every 0.3 s; ``flaky`` ones stop
heartbeating after a random 2-8 s but stay alive (a hang), so the watchdog
kills them and circusd respawns them (the first kill comes well within 15 s);
``unmonitored`` never heartbeats and is not matched by ``watchers_regex``, so
it is left alone.

circusd runs in a session of its own, without ``circusd-stats`` (no
``stats_endpoint``: circus 0.19 starts circusd-stats whenever it is set, even
with ``statsd = False``). When the demo ends it asks circusd to ``quit``; if
circusd has not exited ``QUIT_TIMEOUT`` seconds later (it can wedge on
``quit`` while a kill is under way), the demo SIGKILLs circusd's whole process
group and every process circusd had started (circus starts each in a session
of its own, out of that group), so it never leaves one behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
from circus.client import CircusClient

LOOP_RATE = 1.0  # seconds; timeout = LOOP_RATE * MAX_COUNT
MAX_COUNT = 3
REFRESH = 0.5  # seconds between screen updates
START_TIMEOUT = 20.0  # seconds for circusd and the plugin to come up
QUIT_TIMEOUT = 5.0  # seconds for circusd to answer `quit` and then to exit
KILL_TIMEOUT = 5.0  # seconds for SIGKILLed processes to be gone

# Straight to loopback, whatever http_proxy says.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that were free a moment ago."""
    # Hold every socket until all are bound so the ports are distinct.
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def fetch_status(port: int, timeout: float = 2.0) -> dict[str, Any] | None:
    """The watchdog's /status JSON, or None while it does not answer."""
    url = f"http://127.0.0.1:{port}/status"
    try:
        with _DIRECT.open(url, timeout=timeout) as reply:
            status: dict[str, Any] = json.loads(reply.read())
    except OSError:
        return None
    return status


def write_ini(folder: Path) -> tuple[Path, str, int]:
    """Write the demo's circus.ini; returns its path, endpoint and metrics port."""
    endpoint_port, pubsub_port, udp_port, metrics_port = free_ports(4)
    worker = f"{sys.executable} -m circus_watchdog.demo_worker"
    worker += f" --address 127.0.0.1:{udp_port}"
    endpoint = f"tcp://127.0.0.1:{endpoint_port}"
    ini = folder / "circus.ini"
    ini.write_text(
        f"""[circus]
endpoint = {endpoint}
pubsub_endpoint = tcp://127.0.0.1:{pubsub_port}
statsd = False
multicast_endpoint =
check_delay = 1

[watcher:steady]
cmd = {worker} --interval 0.3
numprocesses = 3

[watcher:flaky]
cmd = {worker} --interval 0.3 --hang-after 2:8
numprocesses = 3
graceful_timeout = 1

[watcher:unmonitored]
cmd = {worker} --silent
numprocesses = 2

[plugin:watchdog]
use = circus_watchdog.plugin.WatchDog
loop_rate = {LOOP_RATE}
max_count = {MAX_COUNT}
watchers_regex = ^(steady|flaky)$
port = {udp_port}
metrics_port = {metrics_port}
"""
    )
    return ini, endpoint, metrics_port


def kill_counts(status: dict[str, Any]) -> list[str]:
    """``watcher: kills`` for every monitored or killed watcher, by name."""
    kills: dict[str, int] = status["kills"]
    watchers = {row["watcher"] for row in status["pids"]} | set(kills)
    return [f"{name}: {kills.get(name, 0)}" for name in sorted(watchers)]


def render(
    status: dict[str, Any],
    rate: float,
    elapsed: float,
    unmonitored: list[int] | None,
    metrics_port: int,
) -> str:
    """One screen of the live view: the stop hint and the metrics URL on top."""
    kills = status["kills"]
    url = f"http://127.0.0.1:{metrics_port}"
    lines = [
        f"circus-watchdog demo  {elapsed:5.0f}s   {status['version']}",
        f"Ctrl-C to stop   metrics {url}/metrics  (and /status)",
        f"timeout {status['timeout']:g}s   heartbeats/s {rate:8.0f}   "
        f"kills {sum(kills.values())}",
        *(f"  {line}" for line in kill_counts(status)),
        "",
        f"{'watcher':<12} {'pid':>8} {'last heartbeat':>16}",
    ]
    timeout = status["timeout"]
    for row in sorted(status["pids"], key=lambda r: (r["watcher"], r["pid"])):
        age = row["age"]
        late = age - timeout
        mark = f"  late by {late:.1f}s (timeout {timeout:g}s)" if late > 0 else ""
        lines.append(f"{row['watcher']:<12} {row['pid']:>8} {age:>14.1f}s{mark}")
    for pid in status["killing"]:
        lines.append(f"{'(killing)':<12} {pid:>8}")
    pids = "?" if unmonitored is None else " ".join(map(str, sorted(unmonitored)))
    lines.append(f"{'unmonitored':<12} {pids}  (not matched: never killed)")
    return "\n".join(lines)


def summary(status: dict[str, Any]) -> str:
    """The line printed when the demo ends."""
    kills = status["kills"]
    return (
        f"demo summary: {sum(kills.values())} kill(s) "
        f"({', '.join(kill_counts(status))}), "
        f"{status['heartbeats']} heartbeats, {status['would_kill']} dry-run, "
        f"{status['kills_held']} held"
    )


def list_pids(client: CircusClient, watcher: str) -> list[int] | None:
    """The pids circusd runs for ``watcher``; None if it did not answer."""
    try:
        reply = client.call({"command": "list", "properties": {"name": watcher}})
    except Exception:  # noqa: BLE001 - the view must not die on a hiccup
        return None
    pids = reply.get("pids") if isinstance(reply, dict) else None
    return [int(pid) for pid in pids] if isinstance(pids, list) else None


def _quit(circusd: subprocess.Popen[bytes], endpoint: str) -> bool:
    """Ask circusd to quit; whether it is gone within QUIT_TIMEOUT seconds."""
    if circusd.poll() is not None:
        return True
    client = CircusClient(endpoint=endpoint, timeout=QUIT_TIMEOUT)
    try:
        client.call({"command": "quit", "properties": {}})
        circusd.wait(timeout=QUIT_TIMEOUT)
    except Exception:  # noqa: BLE001 - no answer, an error reply or no exit
        return False
    finally:
        client.stop()
    return True


def stop_circusd(circusd: subprocess.Popen[bytes], endpoint: str) -> None:
    """Ask circusd to quit; if it is not gone within QUIT_TIMEOUT seconds,
    SIGKILL its process group and every process it had started."""
    try:
        started = psutil.Process(circusd.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        started = []
    if _quit(circusd, endpoint):
        return
    print(
        f"circusd did not quit within {QUIT_TIMEOUT:g} s: killing its processes",
        file=sys.stderr,
    )
    with contextlib.suppress(ProcessLookupError):
        os.killpg(circusd.pid, signal.SIGKILL)
    for proc in started:  # circus starts each process in a new session
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        circusd.wait(timeout=KILL_TIMEOUT)
    psutil.wait_procs(started, timeout=KILL_TIMEOUT)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit code."""
    parser = argparse.ArgumentParser(prog="circus-watchdog demo")
    parser.add_argument(
        "--duration", type=float, default=None, help="seconds (default: until Ctrl-C)"
    )
    parser.add_argument(
        "--plain", action="store_true", help="print lines instead of redrawing"
    )
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="circus-watchdog-demo-"))
    ini, endpoint, metrics_port = write_ini(folder)
    log = (folder / "circusd.log").open("wb")
    # A session of its own: Ctrl-C reaches only the demo, which then stops
    # circusd, and the fallback can end the whole process group.
    circusd = subprocess.Popen(
        [sys.executable, "-m", "circus.circusd", str(ini)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=folder,
        start_new_session=True,
    )
    client = CircusClient(endpoint=endpoint, timeout=5)
    live = sys.stdout.isatty() and not args.plain
    started = time.monotonic()
    end = started + args.duration if args.duration is not None else float("inf")
    status = None
    try:
        print(f"circusd started (pid {circusd.pid}) in {folder}; Ctrl-C to stop")
        while status is None:
            if time.monotonic() - started > START_TIMEOUT or circusd.poll() is not None:
                print("the demo did not start; circusd log:", file=sys.stderr)
                print((folder / "circusd.log").read_text()[-3000:], file=sys.stderr)
                return 1
            time.sleep(0.2)
            status = fetch_status(metrics_port)
        last_beats, last_t, printed = status["heartbeats"], time.monotonic(), 0.0
        while time.monotonic() < end:
            time.sleep(REFRESH)
            now = time.monotonic()
            status = fetch_status(metrics_port) or status
            rate = (status["heartbeats"] - last_beats) / (now - last_t)
            last_beats, last_t = status["heartbeats"], now
            unmonitored = list_pids(client, "unmonitored")
            screen = render(status, rate, now - started, unmonitored, metrics_port)
            if live:
                print("\x1b[H\x1b[2J" + screen, flush=True)
            elif now - printed >= 2:
                printed = now
                print(screen + "\n", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        client.stop()
        stop_circusd(circusd, endpoint)
        log.close()
        shutil.rmtree(folder, ignore_errors=True)
    if status is not None:
        print(summary(status))
    return 0
