"""Helpers for tests that run a real circusd on loopback.

``start_circusd(workdir, sections)`` writes ``workdir/circus.ini`` (free
loopback ports, no statsd, httpd or multicast discovery) with the given
watcher and plugin sections, starts circusd on it and returns a `Circusd` once
it answers ``list``. Its log is ``workdir/circusd.log``; set
``CIRCUS_WATCHDOG_TEST_LOGLEVEL=debug`` for more. Stop it with ``stop()``, or
take the ``circusd_factory`` fixture (tests/conftest.py), which stops every
circusd it started, and everything they started, when the test ends::

    def test_app(circusd_factory):
        circusd = circusd_factory(f"[watcher:app]\\ncmd = {SLEEPER}\\nnumprocesses = 2")
        circusd.wait_for(lambda: len(circusd.pids("app")) == 2, timeout=5)

Async tests run a coroutine on each event loop with ``run(loop_factory, coro)``
and the ``loop_factory`` fixture.

Watchdog tests run heartbeating processes with ``worker_cmd(udp_port, ...)``
(circus_watchdog.demo_worker: healthy, hanging after a while, silent, or in a
custom format), read the watchdog's ``fetch_status``/``fetch_metrics`` on its
metrics port, and time kills with ``check_kill_latency``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil
from circus.client import CircusClient

from circus_watchdog.demo import free_ports

T = TypeVar("T")

#: A watcher command: sleeps up to 600 s, exits within 0.2 s of losing its
#: parent (a SIGKILLed circusd leaves no stray processes behind).
SLEEPER = (
    f'{sys.executable} -c "import os, time; p = os.getppid(); '
    'any(os.getppid() != p or time.sleep(0.2) for _ in range(3000))"'
)

CONFLICT = "arbiter is already running"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    return free_ports(1)[0]


def wait_for(predicate: Callable[[], T], timeout: float, interval: float = 0.05) -> T:
    """Poll ``predicate`` until it is truthy and return its value."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    raise AssertionError(f"{predicate!r} still false after {timeout} s")


@dataclass
class Circusd:
    """A circusd subprocess and synchronous helpers to drive it."""

    endpoint: str
    pubsub: str
    ini: Path
    proc: subprocess.Popen[bytes]
    workdir: Path
    # Processes left behind by kill() (circusd's children), reaped by stop().
    orphans: list[psutil.Process] = field(default_factory=list)

    @property
    def log(self) -> Path:
        """circusd's stdout and stderr."""
        return self.workdir / "circusd.log"

    def call(self, command: str, *, timeout: float = 5.0, **props: Any) -> Any:
        """Run a command like circusctl; AssertionError on an error reply.

        Retries (5 s at most) while circusd is busy with an exclusive command.
        """
        for _ in range(50):
            client = CircusClient(endpoint=self.endpoint, timeout=timeout)
            try:
                res = client.send_message(command, **props)
            finally:
                client.stop()
            # circusd runs one exclusive command (incr, set, its periodic
            # sweep...) at a time and turns the others away: retry those.
            if not str(res.get("reason")).startswith(CONFLICT):
                break
            time.sleep(0.1)
        if res.get("status") != "ok":
            raise AssertionError(f"circusd {command} {props}: {res}")
        return res

    def pids(self, watcher: str) -> list[int]:
        """The pids circusd lists for ``watcher``, sorted."""
        return sorted(self.call("list", name=watcher)["pids"])

    def wait_for(
        self, predicate: Callable[[], T], timeout: float, interval: float = 0.05
    ) -> T:
        """Poll ``predicate`` until it is truthy; AssertionError on timeout."""
        try:
            return wait_for(predicate, timeout, interval)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- circusd log ---\n{self.tail()}") from None

    def tail(self, lines: int = 40) -> str:
        """The end of circusd's log."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """Quit circusd (SIGKILL if it lingers) and end every process it started."""
        if self.proc.poll() is None:
            self.orphans += _descendants(self.proc.pid)
            try:
                self.call("quit", timeout=2.0)
                self.proc.wait(STOP_TIMEOUT)
            except Exception:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        for proc in self.orphans:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(self.orphans, timeout=STOP_TIMEOUT)
        self.orphans.clear()

    def kill(self) -> None:
        """SIGKILL circusd, leaving its children orphaned (stop() ends them)."""
        self.orphans += _descendants(self.proc.pid)
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(STOP_TIMEOUT)

    def restart(self) -> None:
        """Start a new circusd on the same ini and ports (the old one must be down)."""
        if self.proc.poll() is None:
            raise RuntimeError("circusd is still running: stop() or kill() it first")
        self.proc = _launch(self.ini, self.log)
        self._wait_ready()

    def _wait_ready(self) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"circusd exited: {self.proc.returncode}")
            try:
                self.call("list", timeout=0.5)
            except Exception:
                return False
            return True

        self.wait_for(ready, START_TIMEOUT, interval=0.1)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return list(psutil.Process(pid).children(recursive=True))
    except psutil.NoSuchProcess:
        return []


def _launch(ini: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "circus.circusd", str(ini)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ini.parent,
        )


def start_circusd(
    workdir: Path,
    sections: str,
    *,
    check_delay: float = 1,
    extra_circus_options: str = "",
) -> Circusd:
    """Start circusd with ``sections`` on free loopback ports; wait for ``list``."""
    ctl, pub = free_ports(2)
    endpoint = f"tcp://127.0.0.1:{ctl}"
    pubsub = f"tcp://127.0.0.1:{pub}"
    loglevel = os.environ.get("CIRCUS_WATCHDOG_TEST_LOGLEVEL", "info")
    ini = workdir / "circus.ini"
    # An empty multicast_endpoint turns off discovery, which would otherwise
    # join a multicast group on every interface.
    ini.write_text(
        f"""\
[circus]
endpoint = {endpoint}
pubsub_endpoint = {pubsub}
multicast_endpoint =
statsd = False
httpd = False
check_delay = {check_delay}
loglevel = {loglevel}
{extra_circus_options}

{sections}
"""
    )
    log = workdir / "circusd.log"
    circusd = Circusd(endpoint, pubsub, ini, _launch(ini, log), workdir)
    try:
        circusd._wait_ready()
    except BaseException:
        circusd.stop()
        raise
    return circusd


@contextmanager
def circusd_pool(workdir: Path) -> Iterator[Callable[..., Circusd]]:
    """Yield a ``start_circusd`` that stops all it started on exit."""
    started: list[Circusd] = []
    count = 0

    def start(sections: str, **kwargs: Any) -> Circusd:
        nonlocal count
        count += 1
        subdir = workdir / f"circusd{count}"
        subdir.mkdir()
        circusd = start_circusd(subdir, sections, **kwargs)
        started.append(circusd)
        return circusd

    try:
        yield start
    finally:
        for circusd in started:
            circusd.stop()


def run(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
    main: Awaitable[T],
    timeout: float = 30.0,
) -> T:
    """Run ``main`` on a fresh loop from ``loop_factory``, bounded by ``timeout``."""
    loop = loop_factory()
    try:
        return loop.run_until_complete(asyncio.wait_for(main, timeout))
    finally:
        try:
            loop.run_until_complete(_cancel_leftovers())
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()


async def _cancel_leftovers() -> None:
    # Tasks a failed test left running, so closing the loop doesn't warn.
    tasks = asyncio.all_tasks() - {asyncio.current_task()}
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# -- heartbeating workers and the watchdog's HTTP endpoints ----------------------

#: Forces the pure-Python core in a subprocess (circusd passes it to the plugin).
NO_EXTENSIONS = "CIRCUS_WATCHDOG_NO_EXTENSIONS"


def use_core(monkeypatch: Any, is_pure_python: bool) -> None:
    """Make subprocesses started from now on (circusd, its plugin, the CLI) pick
    one core, through the environment they inherit."""
    if is_pure_python:
        monkeypatch.setenv(NO_EXTENSIONS, "1")
    else:
        monkeypatch.delenv(NO_EXTENSIONS, raising=False)


def worker_cmd(
    port: int,
    *,
    interval: float = 0.1,
    hang_after: float | None = None,
    hang_file: Path | None = None,
    template: str | None = None,
    silent: bool = False,
) -> str:
    """A watcher ``cmd`` running circus_watchdog.demo_worker against ``port``."""
    args = [sys.executable, "-m", "circus_watchdog.demo_worker"]
    args += ["--address", f"127.0.0.1:{port}", "--interval", str(interval)]
    if hang_after is not None:
        args += ["--hang-after", str(hang_after)]
    if hang_file is not None:
        args += ["--hang-file", str(hang_file)]
    if template is not None:
        args += ["--format", template]
    if silent:
        args.append("--silent")
    return shlex.join(args)


def hang_times(path: Path) -> dict[int, float]:
    """pid -> time.time() of its last heartbeat, for each worker that hung."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    found: dict[int, float] = {}
    for line in text.splitlines():
        pid, _, last = line.partition(" ")
        if pid and last:
            found[int(pid)] = float(last)
    return found


# Straight to loopback, whatever http_proxy says.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(port: int, path: str, timeout: float = 2.0) -> bytes | None:
    """GET http://127.0.0.1:port/path; None while nothing answers there."""
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with _DIRECT.open(url, timeout=timeout) as reply:
            body: bytes = reply.read()
            return body
    except OSError:
        return None


def fetch_status(port: int) -> dict[str, Any] | None:
    """The watchdog's /status JSON, or None while it does not answer."""
    body = http_get(port, "/status")
    return None if body is None else json.loads(body)  # type: ignore[no-any-return]


def fetch_metrics(port: int) -> dict[str, float] | None:
    """The watchdog's /metrics as {series (name and labels): value}, or None."""
    body = http_get(port, "/metrics")
    if body is None:
        return None
    series: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            series[name] = float(value)
    return series


def metric(series: dict[str, float], name: str, **labels: str) -> float:
    """One value of ``circus_watchdog_<name>`` (0 when the series is absent)."""
    key = f"circus_watchdog_{name}"
    if labels:
        key += "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    return series.get(key, 0.0)


def wait_gone(circusd: Circusd, watcher: str, pid: int, timeout: float) -> float:
    """Wait until circusd no longer lists ``pid``; the time.time() it was seen gone."""
    circusd.wait_for(lambda: pid not in circusd.pids(watcher), timeout, interval=0.02)
    return time.time()


def process_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie nobody reaps counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_pids(
    circusd: Circusd, counts: dict[str, int], timeout: float = 10.0
) -> dict[str, list[int]]:
    """Wait until each watcher runs its number of processes; their pids."""

    def all_up() -> dict[str, list[int]] | None:
        pids = {name: circusd.pids(name) for name in counts}
        ok = all(len(pids[name]) == n for name, n in counts.items())
        return pids if ok else None

    return circusd.wait_for(all_up, timeout)


def check_kill_latency(
    circusd: Circusd,
    watcher: str,
    pid: int,
    hangs: Path,
    *,
    timeout: float,
    tick: float,
    since: float = 0.0,
    slack: float = 0.4,
) -> float:
    """Wait for hung ``pid`` (a worker with ``--hang-file hangs``) to leave
    circusd's list, and check when against the contract: never before
    ``timeout`` after its last heartbeat, at most one ``tick`` after that (or
    after ``since``, a time.time() by which the watchdog monitored it, should
    it have hung before the watchdog knew it), with ``slack`` for the kill
    round trip, circusd's bookkeeping and this polling (keep it under
    loop_rate: the original plugin kills up to one loop_rate late).

    Returns the time from the last heartbeat to the pid's disappearance."""
    gone_at = wait_gone(circusd, watcher, pid, timeout=10 + timeout)
    last_beat = wait_for(lambda: hang_times(hangs).get(pid), timeout=1)
    assert gone_at - last_beat >= timeout - 0.05, gone_at - last_beat
    assert gone_at - max(last_beat, since) <= timeout + tick + slack, (
        gone_at - last_beat,
        gone_at - since,
    )
    return gone_at - last_beat


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that was free a moment ago (for heartbeats)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- the standalone command ----------------------------------------------------

STANDALONE_EXIT_BOUND = 5.0  # seconds to exit after a signal
STANDALONE_START_BOUND = 15.0  # seconds for the command to answer on its metrics port


def command() -> list[str]:
    """The installed ``circus-watchdog`` script (``python -m`` without one)."""
    script = Path(sys.executable).with_name("circus-watchdog")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "circus_watchdog"]


@dataclass
class Standalone:
    """A running ``circus-watchdog`` and its metrics port."""

    proc: subprocess.Popen[bytes]
    port: int  # metrics
    log: Path

    def status(self) -> dict[str, Any]:
        status = fetch_status(self.port)
        assert status is not None, self.tail()
        return status

    def metrics(self) -> dict[str, float]:
        series = fetch_metrics(self.port)
        assert series is not None, self.tail()
        return series

    def monitored(self) -> dict[int, str]:
        return {row["pid"]: row["watcher"] for row in self.status()["pids"]}

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self, signum: int) -> int:
        """Send ``signum``; the exit code, within STANDALONE_EXIT_BOUND seconds."""
        self.proc.send_signal(signum)
        return self.proc.wait(STANDALONE_EXIT_BOUND)


def kills(series: dict[str, float]) -> dict[str, float]:
    """Kills by watcher, from /metrics."""
    prefix = 'circus_watchdog_kills_total{watcher="'
    return {
        name[len(prefix) : -2]: value
        for name, value in series.items()
        if name.startswith(prefix)
    }


@contextmanager
def standalone_pool(workdir: Path) -> Iterator[Callable[..., Standalone]]:
    """``start(circusd, *flags, core=TAG) -> Standalone`` for a running
    ``circus-watchdog``; each is killed at the end if still up."""
    started: list[Standalone] = []

    def start(circusd: Circusd, *flags: str, core: str) -> Standalone:
        port = free_port()
        log = workdir / f"watchdog{len(started)}.log"
        args = [*command(), "--endpoint", circusd.endpoint, "--pubsub", circusd.pubsub]
        args += ["--metrics-port", str(port), *flags]
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        watchdog = Standalone(proc, port, log)
        started.append(watchdog)

        def up() -> dict[str, Any] | None:
            assert proc.poll() is None, watchdog.tail()
            return fetch_status(port)

        status = wait_for(up, STANDALONE_START_BOUND)
        assert f" core={core} " in status["version"]
        return watchdog

    try:
        yield start
    finally:
        for watchdog in started:
            if watchdog.proc.poll() is None:
                watchdog.proc.kill()
                watchdog.proc.wait(STANDALONE_EXIT_BOUND)
            print(f"--- {watchdog.log.name} ---\n{watchdog.tail()}")
