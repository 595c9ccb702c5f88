"""The engine in-process, against a real circusd, on both cores (and loops).

``Watchdog(config).run(stop)`` runs on its own event loop in a thread, so the
test drives circusd and reads ``/status`` and ``/metrics`` synchronously
meanwhile.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest
import uvloop

from circus_watchdog import engine
from circus_watchdog.config import Config
from circus_watchdog.loadgen._send import send_heartbeats
from support import (
    Circusd,
    fetch_metrics,
    fetch_status,
    free_port,
    free_udp_port,
    metric,
    run,
    wait_for,
    wait_pids,
    worker_cmd,
)

LoopFactory = Callable[[], asyncio.AbstractEventLoop]
Start = Callable[..., Circusd]

LOOP_RATE = 0.5  # seconds
MAX_COUNT = 2
TIMEOUT = LOOP_RATE * MAX_COUNT
TEMPLATE = "hb pid={pid} t={timestamp}"
CUSTOM_REGEX = r"^hb pid=(?P<pid>\d+) t=(?P<timestamp>\S+)$"


class EngineThread:
    """A Watchdog running on a loop from ``loop_factory`` in a thread."""

    def __init__(self, config: Config, loop_factory: LoopFactory) -> None:
        self.config = config
        self.watchdog: engine.Watchdog | None = None
        self._loop_factory = loop_factory
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self.started_at = 0.0  # time.monotonic() when run() was called
        self._error: BaseException | None = None
        # A daemon: a watchdog that failed to stop fails its test, not the run.
        self._thread = threading.Thread(target=self._main, name="watchdog", daemon=True)

    def _main(self) -> None:
        try:
            run(self._loop_factory, self._run(), timeout=120)
        except BaseException as exc:  # handed to the test by stop()
            self._error = exc
        finally:
            self._ready.set()

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.watchdog = engine.Watchdog(self.config)
        self.started_at = time.monotonic()
        self._ready.set()
        await self.watchdog.run(self._stop)

    def start(self) -> EngineThread:
        self._thread.start()
        assert self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        """Stop the watchdog; raise what it raised, if anything."""
        if self._loop is not None and self._stop is not None:
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:  # the loop is already closed
                pass
        self._thread.join(10)
        assert not self._thread.is_alive(), "the watchdog did not stop"
        if self._error is not None:
            raise self._error

    def udp(self) -> tuple[str, int]:
        """The heartbeat socket's address, waiting until it is bound."""

        def bound() -> tuple[str, int] | None:
            assert self._error is None, self._error
            return None if self.watchdog is None else self.watchdog.address

        return wait_for(bound, timeout=10, interval=0.005)

    @property
    def port(self) -> int:
        """The metrics port."""
        assert self.config.metrics_port is not None
        return self.config.metrics_port

    def status(self) -> dict[str, Any]:
        status = fetch_status(self.port)
        assert status is not None
        return status

    def metrics(self) -> dict[str, float]:
        series = fetch_metrics(self.port)
        assert series is not None
        return series

    def monitored(self) -> dict[int, str]:
        return {row["pid"]: row["watcher"] for row in self.status()["pids"]}


@pytest.fixture
def engine_core(core_module: Any, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The engine runs on this core for the test (it imported the default one)."""
    core: ModuleType = core_module.imported_module
    monkeypatch.setattr(engine, "HeartbeatTable", core.HeartbeatTable)
    monkeypatch.setattr(engine, "compiled", not core_module.is_pure_python)
    return core


@pytest.fixture
def watchdog(
    engine_core: ModuleType, circusd_factory: Start
) -> Iterator[Callable[..., EngineThread]]:
    """``start(circusd, loop_factory, **options) -> EngineThread`` (plugin
    options as strings), answering on its metrics port; stopped at teardown,
    before the circusd it watches."""
    started: list[EngineThread] = []

    def start(
        circusd: Circusd, loop_factory: LoopFactory, **options: str
    ) -> EngineThread:
        options.setdefault("loop_rate", str(LOOP_RATE))
        options.setdefault("max_count", str(MAX_COUNT))
        options.setdefault("metrics_port", str(free_port()))
        config = Config.from_options(
            options, endpoint=circusd.endpoint, pubsub_endpoint=circusd.pubsub
        )
        thread = EngineThread(config, loop_factory).start()
        started.append(thread)
        wait_for(lambda: fetch_status(thread.port), timeout=10)
        return thread

    try:
        yield start
    finally:
        for thread in started:
            thread.stop()


def core_tag(core: ModuleType) -> str:
    return "py" if core.__name__.endswith("_py") else "c"


def test_discovery_within_one_second(
    circusd_factory: Start,
    watchdog: Callable[..., EngineThread],
    engine_core: ModuleType,
    loop_factory: LoopFactory,
) -> None:
    """With loop_rate 60 (ticks of 1 s), ``/status`` lists circusd's pids
    within one second of the watchdog starting."""
    udp = free_udp_port()
    circusd = circusd_factory(
        f"""
[watcher:web]
cmd = {worker_cmd(udp, interval=1)}
numprocesses = 3

[watcher:idle]
cmd = {worker_cmd(udp, silent=True)}
numprocesses = 2
"""
    )
    pids = wait_pids(circusd, {"web": 3, "idle": 2})
    expected = {pid: name for name, group in pids.items() for pid in group}
    wd = watchdog(circusd, loop_factory, loop_rate="60", max_count="3", port=str(udp))
    assert f" core={core_tag(engine_core)} " in wd.status()["version"]
    wait_for(lambda: wd.monitored() == expected, timeout=1, interval=0.01)
    assert time.monotonic() - wd.started_at < 1.0
    assert metric(wd.metrics(), "monitored_pids") == len(expected)


# What each datagram is, by the rules of the default format (PID;TIMESTAMP)
# and of CUSTOM_REGEX. Pid 1 (init) and 2**31-1 are valid pids circusd never
# runs: unknown, not malformed.
DEFAULT_MALFORMED = [
    b"",
    b"hello",
    b"1234",
    b";",
    b";1",
    b"0;1",
    b"012;1",
    b"-1;1",
    b"+5;1",
    b" 5;1",
    b"5\n;1",
    b"5;1\n\n",
    b"99999999999;1",
    b"2147483648;1",
    b"\xff\xfe;1",
    b"5;\xff",
    b"x" * 2000,
    b"5;" + b"0" * 1100,
    b"hb pid=5 t=1",
]
DEFAULT_UNKNOWN = [b"1;1", b"2147483647;0", b"1;\n", b"1;caf\xc3\xa9"]
CUSTOM_MALFORMED = [
    b"",
    b"garbage",
    b"1;1",
    b"hb pid=abc t=1",
    b"hb pid=0 t=1",
    b"hb pid=99999999999 t=1",
    b"hb pid=5 t=",
    b"hb pid=\xff t=1",
    b"hb pid=5 t=1" + b" " * 2000,
]
CUSTOM_UNKNOWN = [b"hb pid=1 t=1", b"hb pid=2147483647 t=x", b"hb pid=1 t=1\n"]


# One loop each, to keep the suite short (discovery runs on both).
@pytest.mark.parametrize(
    ("custom", "loop_factory"),
    [(False, uvloop.new_event_loop), (True, asyncio.new_event_loop)],
    ids=["default-uvloop", "msg_regex-asyncio"],
)
def test_garbage_is_counted_and_changes_nothing(
    circusd_factory: Start,
    watchdog: Callable[..., EngineThread],
    loop_factory: LoopFactory,
    custom: bool,
) -> None:
    """Malformed datagrams and heartbeats of unknown pids are counted, and
    neither add, keep alive nor kill anything."""
    udp = free_udp_port()
    template = TEMPLATE if custom else None
    circusd = circusd_factory(
        f"""
[watcher:web]
cmd = {worker_cmd(udp, template=template)}
numprocesses = 2

[watcher:idle]
cmd = {worker_cmd(udp, silent=True)}
numprocesses = 1
"""
    )
    pids = wait_pids(circusd, {"web": 2, "idle": 1})
    options = {"port": str(udp), "watchers_regex": "^web$"}
    if custom:
        options["msg_regex"] = CUSTOM_REGEX
    wd = watchdog(circusd, loop_factory, **options)
    expected = dict.fromkeys(pids["web"], "web")
    wait_for(lambda: wd.monitored() == expected, timeout=5)
    before = wd.metrics()
    malformed = CUSTOM_MALFORMED if custom else DEFAULT_MALFORMED
    unknown = CUSTOM_UNKNOWN if custom else DEFAULT_UNKNOWN
    # Heartbeats for idle's pid (unmonitored: it does not match) are unknown.
    idle = pids["idle"][0]
    fake = (TEMPLATE.format(pid=idle, timestamp=1) if custom else f"{idle};1").encode()
    unknown = [*unknown, fake]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _ in range(3):
            for payload in malformed + unknown:
                sock.sendto(payload, wd.udp())

    def counted() -> bool:
        series = wd.metrics()
        return metric(series, "malformed_total") - metric(
            before, "malformed_total"
        ) == 3 * len(malformed) and metric(series, "unknown_pid_total") - metric(
            before, "unknown_pid_total"
        ) == 3 * len(unknown)

    wait_for(counted, timeout=5)
    assert wd.monitored() == expected
    # Over a couple of timeouts: the heartbeats still flow, nothing died, and
    # the garbage created no entry.
    heartbeats = metric(wd.metrics(), "heartbeats_total")
    time.sleep(1.2 * TIMEOUT)
    series = wd.metrics()
    assert metric(series, "heartbeats_total") > heartbeats
    assert metric(series, "monitored_pids") == len(expected)
    kills = [v for name, v in series.items() if "_kills_total{" in name]
    assert kills == [0.0]  # web's series, present from the start
    assert circusd.pids("web") == pids["web"]
    assert circusd.pids("idle") == pids["idle"]
    assert wd.monitored() == expected


class Relay:
    """Sends the heartbeats of some pids, all in one burst every 0.1 s.

    It stands for a heartbeat path that breaks for many processes at once
    (a sidecar, a firewall rule): when it pauses, their last heartbeats are
    microseconds apart, so they all fall silent in the same tick.
    """

    def __init__(
        self, core: ModuleType, address: tuple[str, int], pids: list[int]
    ) -> None:
        self._core, self._address, self._pids = core, address, pids
        self._sending = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._main, name="relay", daemon=True)

    def _main(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            while not self._done.is_set():
                if self._sending.is_set():
                    send_heartbeats(sock, self._address, self._pids, time.time())
                self._done.wait(0.1)

    def __enter__(self) -> Relay:
        self._sending.set()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(5)

    def pause(self) -> None:
        self._sending.clear()

    def resume(self) -> None:
        self._sending.set()


def test_storm_guard(
    circusd_factory: Start,
    watchdog: Callable[..., EngineThread],
    engine_core: ModuleType,
) -> None:
    """All 4 processes of ``storm`` fall silent at once: their kills are held
    and they keep their pids (and stay when heartbeats resume), while a single
    hung process among healthy ones is killed."""
    udp = free_udp_port()
    circusd = circusd_factory(
        f"""
[watcher:storm]
cmd = {worker_cmd(udp, silent=True)}
numprocesses = 4

[watcher:web]
cmd = {worker_cmd(udp)}
numprocesses = 1

[watcher:hang]
cmd = {worker_cmd(udp, hang_after=0.5)}
numprocesses = 1
"""
    )
    pids = wait_pids(circusd, {"storm": 4, "web": 1, "hang": 1})
    # A coarse tick: the storm's deadlines, microseconds apart, share one.
    wd = watchdog(circusd, uvloop.new_event_loop, port=str(udp), tick="0.25")
    with Relay(engine_core, wd.udp(), pids["storm"]) as relay:
        wait_for(lambda: len(wd.monitored()) == 6, timeout=5)

        def kills(watcher: str) -> float:
            return metric(wd.metrics(), "kills_total", watcher=watcher)

        # One hung process among healthy ones dies.
        wait_for(lambda: kills("hang") >= 1, timeout=5 * TIMEOUT)

        def held() -> float:
            return metric(wd.metrics(), "kills_held_total", reason="storm")

        relay.pause()
        wait_for(lambda: held() >= 4, 3 * TIMEOUT)
        # Held again at the next timeout, never killed.
        wait_for(lambda: held() >= 8, 2 * TIMEOUT)
        assert circusd.pids("storm") == pids["storm"]

        relay.resume()  # heartbeats resume: the hold lifts, nobody dies
        time.sleep(1.2 * TIMEOUT)
        assert circusd.pids("storm") == pids["storm"]
        assert kills("storm") == 0
        assert circusd.pids("web") == pids["web"]
        assert kills("web") == 0
        assert {pid for pid, name in wd.monitored().items() if name == "storm"} == set(
            pids["storm"]
        )
