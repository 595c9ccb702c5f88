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
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil
from circus.client import CircusClient

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


def _free_ports(count: int) -> list[int]:
    # Hold every socket until all are bound so the ports are distinct.
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    return _free_ports(1)[0]


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
    ctl, pub = _free_ports(2)
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
