"""Shared fixtures: the C / pure-Python core facade (propcache style), and the
``circusd`` marker.

``CIRCUS_WATCHDOG_TEST_SLACK`` (default 1) multiplies every wait bound of the
shared helpers (`support.scaled`) and the per-test timeout of pytest.ini.

A test is marked ``circusd`` when it takes a fixture that starts one (see
`CIRCUSD_FIXTURES`; a fixture that takes one of those counts too) or, if it
starts circusd some other way, by a marker line of its own. So
``pytest -m "not circusd"`` runs the unit subset, and `_no_stray_circusd`
fails any unmarked test that starts a circusd anyway, which keeps it so.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from types import ModuleType

import pytest

C_EXT_MARK = pytest.mark.c_extension
CIRCUSD_MARK = pytest.mark.circusd

#: The fixtures of real-circusd tests (``circusd_factory`` starts circusd,
#: ``standalone`` the daemon that watches one): a test that takes one, directly
#: or through another fixture, is marked ``circusd``.
CIRCUSD_FIXTURES = frozenset({"circusd_factory", "standalone"})


@dataclass(frozen=True)
class CoreModule:
    """One implementation of the heartbeat core, C or pure Python."""

    is_pure_python: bool

    @cached_property
    def tag(self) -> str:
        return "py" if self.is_pure_python else "c"

    @cached_property
    def imported_module(self) -> ModuleType:
        name = "_core_py" if self.is_pure_python else "_core_c"
        return importlib.import_module(f"circus_watchdog.{name}")

    def __str__(self) -> str:
        return f"core_{self.tag}"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--c-extensions",
        action=argparse.BooleanOptionalAction,
        default=not os.environ.get("CIRCUS_WATCHDOG_NO_EXTENSIONS"),
        help="run the tests of the compiled core (default: unless "
        "CIRCUS_WATCHDOG_NO_EXTENSIONS is set)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "c_extension: tests of the compiled core (--no-c-extensions skips)"
    )
    config.addinivalue_line(
        "markers", "circusd: starts a real circusd (set from the fixtures it takes)"
    )


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    skip = pytest.mark.skip(reason="--no-c-extensions")
    c_extensions = config.getoption("--c-extensions")
    timeout = _per_test_timeout(config)
    for item in items:
        if CIRCUSD_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(CIRCUSD_MARK)
        if not c_extensions and "c_extension" in item.keywords:
            item.add_marker(skip)
        if timeout and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(timeout))


def _per_test_timeout(config: pytest.Config) -> float:
    """pytest-timeout's bound (--timeout, else pytest.ini) times the slack."""
    if not config.pluginmanager.hasplugin("timeout"):
        return 0.0
    from support import scaled

    option = config.getoption("timeout")
    return scaled(float(config.getini("timeout") if option is None else option))


def _children(pid: int) -> list[int]:
    # /proc/PID/task/TID/children: a few reads, where psutil's children() reads
    # the stat file of every process on the host.
    pids: list[int] = []
    for task in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            with open(task) as children:
                pids += map(int, children.read().split())
        except OSError:
            pass
    return pids


def _circusd_descendants() -> dict[int, str]:
    """pid -> command line of each circusd this process started (or its
    children did)."""
    found = {}
    pids = _children(os.getpid())
    for _ in range(1000):  # a bound: far more descendants than any test has
        if not pids:
            break
        pid = pids.pop()
        pids += _children(pid)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as raw:
                cmdline = raw.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "circus.circusd" in cmdline or any(
            os.path.basename(arg) == "circusd" for arg in cmdline[:2]
        ):
            found[pid] = " ".join(cmdline).strip()
    return found


@pytest.fixture(autouse=True)
def _no_stray_circusd(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test not marked ``circusd`` that starts a circusd (checked five
    times a second while it runs: circusd takes longer than that to start).
    One already running (a module's fixture) is not this test's."""
    if request.node.get_closest_marker("circusd") is not None:
        yield
        return
    before = _circusd_descendants()
    seen: list[str] = []
    done = threading.Event()

    def new() -> list[str]:
        return [
            line for pid, line in _circusd_descendants().items() if pid not in before
        ]

    def watch() -> None:
        # Bounded by the test: done is set when it ends.
        while not seen and not done.wait(0.2):
            seen.extend(new())

    watcher = threading.Thread(target=watch, name="no-stray-circusd", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
    seen.extend(new())
    assert not seen, (
        f"this test started circusd ({seen[0]}) but is not marked circusd: "
        "take the circusd_factory fixture or add @pytest.mark.circusd"
    )


@pytest.fixture(
    scope="session",
    params=[
        pytest.param(CoreModule(is_pure_python=False), marks=C_EXT_MARK),
        CoreModule(is_pure_python=True),
    ],
    ids=str,
)
def core_module(request: pytest.FixtureRequest) -> CoreModule:
    """Each core in turn: every test that takes it runs on both."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def core(core_module: CoreModule) -> ModuleType:
    """The imported core module (``_core_c`` or ``_core_py``)."""
    return core_module.imported_module


@pytest.fixture(scope="session")
def table_cls(core: ModuleType) -> type:
    return core.HeartbeatTable  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def parse_heartbeat(core: ModuleType):  # type: ignore[no-untyped-def]
    return core.parse_heartbeat


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_factory(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """A new-event-loop factory: asyncio's default loop, then uvloop's."""
    if request.param == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    import asyncio

    return asyncio.new_event_loop


@pytest.fixture
def circusd_factory(tmp_path):  # type: ignore[no-untyped-def]
    """``start(sections, **kw) -> Circusd``; every circusd is stopped at teardown."""
    from support import circusd_pool

    with circusd_pool(tmp_path) as start:
        yield start


@pytest.fixture
def core_tag(core_module: CoreModule, monkeypatch: pytest.MonkeyPatch) -> str:
    """Subprocesses started from now on (circusd, its plugin, the command) run
    with this core; its tag, "c" or "py"."""
    from support import use_core

    use_core(monkeypatch, core_module.is_pure_python)
    return core_module.tag


@pytest.fixture
def standalone(tmp_path):  # type: ignore[no-untyped-def]
    """``start(circusd, *flags, core=TAG) -> Standalone``: a running
    ``circus-watchdog``, killed at teardown if still up."""
    from support import standalone_pool

    with standalone_pool(tmp_path) as start:
        yield start
