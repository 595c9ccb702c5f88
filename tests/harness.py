"""What the tests and the benchmarks share: a real circusd and a running
``circus-watchdog`` on free loopback ports, and readers for the watchdog's
``/status`` and ``/metrics``. Tests import these names through ``support``;
the benchmarks (``bench/e2e``) import this module as ``harness``.

``start_circusd(workdir, sections)`` writes ``workdir/circus.ini`` (free
loopback ports, no statsd, httpd or multicast discovery) with the given
watcher and plugin sections, starts circusd on it and returns a `Circusd` once
it answers ``list``. Its log is ``workdir/circusd.log``; set
``CIRCUS_WATCHDOG_TEST_LOGLEVEL=debug`` for more. ``circusd_pool(workdir)``
stops every circusd it started, and everything they started, on exit::

    with circusd_pool(tmp) as start:
        circusd = start(f"[watcher:app]\\ncmd = {SLEEPER}\\nnumprocesses = 2")
        circusd.wait_for(lambda: len(circusd.pids("app")) == 2, timeout=5)

``standalone_pool(workdir)`` does the same for the ``circus-watchdog`` command.
Only loopback is ever used. ``free_ports`` and ``fetch_status`` are the
demo's own (`circus_watchdog.demo`), re-exported here.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil
from circus.client import CircusClient
from prometheus_client.parser import text_string_to_metric_families

from circus_watchdog.demo import fetch_status, free_ports

T = TypeVar("T")

#: A watcher command: sleeps up to 600 s, exits within 0.2 s of losing its
#: parent (a SIGKILLed circusd leaves no stray processes behind).
SLEEPER = (
    f'{sys.executable} -c "import os, time; p = os.getppid(); '
    'any(os.getppid() != p or time.sleep(0.2) for _ in range(3000))"'
)

CONFLICT = "arbiter is already running"
START_TIMEOUT = 20.0  # seconds for circusd to answer `list`
STOP_TIMEOUT = 10.0  # seconds for circusd or a leftover child to exit
STANDALONE_EXIT_BOUND = 5.0  # seconds to exit after a signal
STANDALONE_START_BOUND = 15.0  # seconds for the command to answer on its metrics port


# -- ports and polling ---------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    return free_ports(1)[0]


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that was free a moment ago (for heartbeats)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def scaled(seconds: float) -> float:
    """``seconds`` times CIRCUS_WATCHDOG_TEST_SLACK (default 1): the one factor
    by which a slow or loaded machine stretches every wait and timing bound."""
    return seconds * float(os.environ.get("CIRCUS_WATCHDOG_TEST_SLACK") or 1)


def wait_for(predicate: Callable[[], T], timeout: float, interval: float = 0.05) -> T:
    """Poll ``predicate`` until it is truthy and return its value;
    AssertionError after ``scaled(timeout)`` seconds."""
    timeout = scaled(timeout)
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    raise AssertionError(f"{predicate!r} still false after {timeout} s")


# -- circusd -------------------------------------------------------------------


@dataclass
class Circusd:
    """A circusd subprocess and synchronous helpers to drive it."""

    endpoint: str
    pubsub: str
    ini: Path
    proc: subprocess.Popen[bytes]
    workdir: Path
    # Processes left behind by kill() (circusd's children), reaped by stop().
    orphans: list[Any] = field(default_factory=list)

    @property
    def log(self) -> Path:
        """circusd's stdout and stderr."""
        return self.workdir / "circusd.log"

    def call(self, command: str, *, timeout: float = 5.0, **props: Any) -> Any:
        """Run a command like circusctl; AssertionError on an error reply.

        Retries (5 s at most) while circusd is busy with an exclusive command.
        """
        res: dict[str, Any] = {}
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
        self.proc.kill()
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


def _descendants(pid: int) -> list[Any]:
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
    statsd: bool = False,
) -> Circusd:
    """Start circusd with ``sections`` on free loopback ports; wait for ``list``.
    ``statsd`` runs circus's own ``circusd-stats`` watcher too."""
    ctl, pub, stats = free_ports(3)
    endpoint = f"tcp://127.0.0.1:{ctl}"
    pubsub = f"tcp://127.0.0.1:{pub}"
    loglevel = os.environ.get("CIRCUS_WATCHDOG_TEST_LOGLEVEL", "info")
    ini = workdir / "circus.ini"
    # circus turns statsd on whenever stats_endpoint is set.
    stats_options = (
        f"statsd = True\nstats_endpoint = tcp://127.0.0.1:{stats}"
        if statsd
        else "statsd = False"
    )
    # An empty multicast_endpoint turns off discovery, which would otherwise
    # join a multicast group on every interface.
    ini.write_text(
        f"""\
[circus]
endpoint = {endpoint}
pubsub_endpoint = {pubsub}
multicast_endpoint =
{stats_options}
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


# -- the watchdog's HTTP endpoints ---------------------------------------------

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


def series_key(name: str, labels: dict[str, str]) -> str:
    """``name{a="1",b="2"}`` with labels sorted; just ``name`` without labels."""
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition as {series_key(name, labels): value}."""
    return {
        series_key(sample.name, sample.labels): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def fetch_metrics(port: int) -> dict[str, float] | None:
    """The watchdog's /metrics (see `parse_metrics`), or None while it does not
    answer."""
    body = http_get(port, "/metrics")
    return None if body is None else parse_metrics(body.decode())


def metric(series: dict[str, float], name: str, **labels: str) -> float:
    """One value of ``circus_watchdog_<name>`` (0 when the series is absent)."""
    return series.get(series_key(f"circus_watchdog_{name}", labels), 0.0)


def kills(series: dict[str, float]) -> dict[str, float]:
    """Kills by watcher, from /metrics: the watchers with at least one kill."""
    prefix = 'circus_watchdog_kills_total{watcher="'
    return {
        name[len(prefix) : -2]: value
        for name, value in series.items()
        if name.startswith(prefix) and value > 0
    }


# -- the standalone command ----------------------------------------------------


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
        """/status; AssertionError (with the log) if it does not answer."""
        status = fetch_status(self.port)
        assert status is not None, self.tail()
        return status

    def metrics(self) -> dict[str, float]:
        """/metrics; AssertionError (with the log) if it does not answer."""
        series = fetch_metrics(self.port)
        assert series is not None, self.tail()
        return series

    def monitored(self) -> dict[int, str]:
        """pid -> watcher, as /status lists them."""
        return {row["pid"]: row["watcher"] for row in self.status()["pids"]}

    def tail(self) -> str:
        """The end of its log."""
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self, signum: int) -> int:
        """Send ``signum``; the exit code, within STANDALONE_EXIT_BOUND seconds."""
        self.proc.send_signal(signum)
        return self.proc.wait(STANDALONE_EXIT_BOUND)


@contextmanager
def standalone_pool(
    workdir: Path, *, show_logs: bool = True
) -> Iterator[Callable[..., Standalone]]:
    """``start(circusd, *flags, core=TAG) -> Standalone`` for a running
    ``circus-watchdog`` (``core=None`` accepts either core); each is killed at
    the end if still up, and its log printed unless ``show_logs`` is false."""
    started: list[Standalone] = []

    def start(circusd: Circusd, *flags: str, core: str | None) -> Standalone:
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
        assert status is not None  # wait_for returns only a truthy value
        if core is not None:
            assert f" core={core} " in status["version"], status["version"]
        return watchdog

    try:
        yield start
    finally:
        for watchdog in started:
            if watchdog.proc.poll() is None:
                watchdog.proc.kill()
                watchdog.proc.wait(STANDALONE_EXIT_BOUND)
            if show_logs:
                print(f"--- {watchdog.log.name} ---\n{watchdog.tail()}")
