"""Benchmark fixtures: each implementation side by side in one session.

``impl`` runs a benchmark on the compiled core (``c``), its pure twin (``py``)
and circus's own WatchDog code path (``original``); ``receiver`` puts the
count-only recvmmsg drain ``count`` (bench/count_drain.c) first for the drain.  Run with
``pytest bench/ --benchmark-columns=mean,stddev,ops --benchmark-group-by=group``;
per-operation figures, ratios and the targets are printed at the end.
"""

from __future__ import annotations

import ctypes
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from circus_watchdog.sockets import set_rcvbuf
from report import Results, format_summary
from support import Impl, UdpPair, core_module, original_watchdog

C_EXT_MARK = pytest.mark.c_extension
ORIGINAL_MARK = pytest.mark.original
RCVBUF = 32 << 20  # bytes asked for; Linux doubles it for its bookkeeping
DRAIN_BACKLOG = 50_048  # heartbeats per drain round, a multiple of the batch (64)
RESULTS_KEY = pytest.StashKey[Results]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "c_extension: benchmarks of compiled code (the core or the count-only drain)",
    )
    config.addinivalue_line(
        "markers", "original: benchmarks of circus.plugins.watchdog.WatchDog"
    )
    config.stash[RESULTS_KEY] = Results()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    results = config.stash.get(RESULTS_KEY, None)
    if results is None or not results.rows:
        return
    terminalreporter.write_sep("-", "circus-watchdog core benchmarks: summary")
    for line in format_summary(results):
        terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def results(pytestconfig: pytest.Config) -> Results:
    """Where benchmarks leave figures for the end-of-session summary."""
    return pytestconfig.stash[RESULTS_KEY]


def _params(*tags: str) -> list[Any]:
    marks = {"c": C_EXT_MARK, "count": C_EXT_MARK, "original": ORIGINAL_MARK}
    return [pytest.param(t, marks=marks[t]) if t in marks else t for t in tags]


def _make_impl(request: pytest.FixtureRequest) -> Iterator[Impl]:
    tag = request.param
    if tag == "original":
        with original_watchdog() as wd:
            yield Impl(tag, watchdog=wd)
    elif tag == "count":
        lib = request.getfixturevalue("count_drain_lib")
        yield Impl(tag, count_drain=lib.count_drain)
    else:
        try:
            core = core_module(tag)
        except ImportError as exc:
            pytest.skip(f"the compiled core is not built: {exc}")
        yield Impl(tag, core=core)


@pytest.fixture(params=_params("c", "py", "original"), ids=str)
def impl(request: pytest.FixtureRequest) -> Iterator[Impl]:
    """The compiled core, its pure twin, then circus's original WatchDog."""
    yield from _make_impl(request)


@pytest.fixture(params=_params("count", "c", "py", "original"), ids=str)
def receiver(request: pytest.FixtureRequest) -> Iterator[Impl]:
    """The count-only recvmmsg drain, then the same three as ``impl``."""
    yield from _make_impl(request)


@pytest.fixture(scope="session")
def count_drain_lib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    """bench/count_drain.c, compiled with gcc -O2 for this session and loaded."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not found on PATH: cannot build the count-only recvmmsg drain")
    out = tmp_path_factory.mktemp("count_drain") / "count_drain.so"
    src = Path(__file__).with_name("count_drain.c")
    subprocess.run(
        [gcc, "-O2", "-shared", "-fPIC", "-o", str(out), str(src)],
        check=True,
        capture_output=True,
    )
    lib = ctypes.CDLL(str(out))
    lib.count_drain.argtypes = [ctypes.c_int, ctypes.c_long]
    lib.count_drain.restype = ctypes.c_long
    return lib


@pytest.fixture(scope="session")
def udp_pair() -> Iterator[UdpPair]:
    """127.0.0.1 sockets whose receiver queue holds tens of thousands of heartbeats.

    The receiver asks for 32 MiB as the daemon sizes its socket
    (``circus_watchdog.sockets.set_rcvbuf``: SO_RCVBUFFORCE where allowed,
    else as much as net.core.rmem_max grants).  The capacity is measured by
    sending more than fits; each drain round queues 3/4 of it at most, so the
    kernel never drops.
    """
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        set_rcvbuf(rx, RCVBUF)
        rx.bind(("127.0.0.1", 0))
        rx.setblocking(False)
        tx.connect(rx.getsockname())
        pair = UdpPair(rx, tx, rx.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
        pair.fill(range(1, 200_001))
        pair.capacity = pair.flush()
        pair.backlog = min(DRAIN_BACKLOG, pair.capacity * 3 // 4 // 64 * 64)
        if pair.backlog < 64:
            pytest.skip(f"receive buffer too small ({pair.rcvbuf} bytes)")
        yield pair
    finally:
        rx.close()
        tx.close()
