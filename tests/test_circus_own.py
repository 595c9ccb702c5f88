"""circus's own processes are never monitored by default, and a circusd that
does not answer is never silent (real circusd, real standalone daemon)."""

from __future__ import annotations

import time
from collections.abc import Callable
from types import SimpleNamespace

import pytest

from support import (
    Circusd,
    Standalone,
    free_ports,
    free_udp_port,
    kills,
    metric,
    wait_for,
    wait_pids,
    worker_cmd,
)

LOOP_RATE, MAX_COUNT = 0.5, 2
TIMEOUT = LOOP_RATE * MAX_COUNT
FLAGS = ["--loop-rate", str(LOOP_RATE), "--max-count", str(MAX_COUNT)]


@pytest.mark.parametrize("include", [False, True], ids=["default", "include_circus"])
def test_circusd_stats_and_plugins_are_excluded_by_default(
    circusd_factory: Callable[..., Circusd],
    standalone: Callable[..., Standalone],
    include: bool,
) -> None:
    free_udp = free_udp_port()
    circusd = circusd_factory(
        f"[watcher:web]\ncmd = {worker_cmd(free_udp)}\nnumprocesses = 2\n\n"
        "[plugin:flapping]\nuse = circus.plugins.flapping.Flapping\n",
        statsd=True,
    )
    wait_pids(circusd, {"web": 2, "circusd-stats": 1, "plugin:flapping": 1})
    flags = [*FLAGS, "--port", str(free_udp)]
    wd = standalone(
        circusd, *flags, *(["--include-circus"] if include else []), core=None
    )
    status = wait_for(lambda: (s := wd.status())["connected"] and s, 10)
    if include:
        # circus's processes send no heartbeats: with the option they die.
        wait_for(lambda: "circusd-stats" in kills(wd.metrics()), 6 * TIMEOUT)
        assert status["excluded"] == {}
        return
    assert status["excluded"] == {"circusd-stats": 1, "plugin:flapping": 1}
    assert {row["watcher"] for row in status["pids"]} == {"web"}
    assert metric(wd.metrics(), "excluded_pids") == 2
    time.sleep(3 * TIMEOUT)
    assert kills(wd.metrics()) == {}, wd.tail()


def test_a_circusd_that_does_not_answer_is_reported(
    standalone: Callable[..., Standalone],
) -> None:
    ctl, pub = free_ports(2)  # nothing listens there
    nowhere = SimpleNamespace(
        endpoint=f"tcp://127.0.0.1:{ctl}", pubsub=f"tcp://127.0.0.1:{pub}"
    )
    flags = [*FLAGS, "--call-timeout", "1", "--port", str(free_udp_port())]
    wd = standalone(nowhere, *flags, core=None)
    wait_for(lambda: "does not answer" in wd.tail(), 10)
    line = next(line for line in wd.tail().splitlines() if "does not answer" in line)
    assert "WARNING" in line and nowhere.endpoint in line
    assert "nothing will be killed until it does" in line
    assert metric(wd.metrics(), "circusd_connected") == 0
    assert wd.tail().count("does not answer") == 1  # the next one 30 s later


def test_the_pure_core_is_a_warning_at_start(
    circusd_factory: Callable[..., Circusd],
    standalone: Callable[..., Standalone],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from support import use_core

    use_core(monkeypatch, True)
    circusd = circusd_factory("")
    wd = standalone(circusd, *FLAGS, "--port", str(free_udp_port()), core="py")
    line = next(line for line in wd.tail().splitlines() if "pure-Python" in line)
    assert "WARNING" in line and "CIRCUS_WATCHDOG_NO_EXTENSIONS" in line
