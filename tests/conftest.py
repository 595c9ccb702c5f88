"""Shared fixtures: the C / pure-Python core facade (propcache style)."""

from __future__ import annotations

import argparse
import importlib
import os
from dataclasses import dataclass
from functools import cached_property
from types import ModuleType

import pytest

C_EXT_MARK = pytest.mark.c_extension


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
    config.addinivalue_line("markers", "circusd: starts a real circusd")


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    if config.getoption("--c-extensions"):
        return
    skip = pytest.mark.skip(reason="--no-c-extensions")
    for item in items:
        if "c_extension" in item.keywords:
            item.add_marker(skip)


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
