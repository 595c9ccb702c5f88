"""Sync against a fake circusd: re-syncs, events, "connected" (no circusd)."""

from __future__ import annotations

import asyncio
import logging
from types import ModuleType

import pytest

from circus_watchdog.circusd import CircusError, Event
from circus_watchdog.metrics import Metrics
from circus_watchdog.registry import Registry
from circus_watchdog.sync import WARN_INTERVAL, Sync
from fake_circusd import FakeCircusd, config


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(core: ModuleType, watchers: dict[str, list[int]], **options: str):  # type: ignore[no-untyped-def]
    cfg = config(**options)
    registry = Registry(core.HeartbeatTable(cfg.timeout, cfg.tick), cfg, self_pids=[])
    fake, clock = FakeCircusd(watchers), Clock()
    sync = Sync(
        fake,
        registry,
        Metrics(),
        endpoint=cfg.endpoint,
        resync_interval=60,
        clock=clock,
    )
    return sync, fake, clock


def monitored(sync: Sync) -> set[int]:
    return set(sync.registry.table.pids())


def test_a_resync_connects_and_learns(core: ModuleType) -> None:
    sync, fake, _ = make(core, {"web": [10, 11], "db": [12]}, watchers_regex="web")
    assert not sync.connected
    asyncio.run(sync.resync())
    assert sync.connected and sync.metrics.resyncs == 1
    assert monitored(sync) == {10, 11}
    assert ("list", {"name": "db"}) not in fake.calls  # not matched: not read


def test_an_event_during_list_wins(core: ModuleType) -> None:
    sync, fake, clock = make(core, {"web": [10, 11]})
    asyncio.run(sync.resync())
    fake.watchers["web"] = [10, 11]  # the listing below still shows 11

    def reap_meanwhile() -> None:
        sync.apply(Event("web", "reap", {"process_pid": 11}))
        sync.apply(Event("web", "spawn", {"process_pid": 13}))

    fake.during_list = reap_meanwhile
    asyncio.run(sync.resync())
    assert monitored(sync) == {10, 13}


def test_a_failed_resync_disconnects_and_warns_every_30_s(
    core: ModuleType, caplog: pytest.LogCaptureFixture
) -> None:
    sync, fake, clock = make(core, {"web": [10]})
    asyncio.run(sync.resync())
    fake.down = True
    caplog.set_level(logging.WARNING, "circus.watchdog")
    for step in range(7):  # 7 failures 5 s apart: 30 s
        with pytest.raises(CircusError):
            asyncio.run(sync.resync())
        sync._failed(CircusError("list", "no reply"))
        clock.now += WARN_INTERVAL / 6
        assert not sync.connected, step
    warnings = [r for r in caplog.records if "does not answer" in r.getMessage()]
    assert len(warnings) == 2
    assert "nothing will be killed until it does" in warnings[0].getMessage()
    assert fake.calls[-1] == ("list", {})
    fake.down = False
    asyncio.run(sync.resync())
    assert sync.connected and monitored(sync) == {10}


def test_reconnect_gives_fresh_timeouts(core: ModuleType) -> None:
    sync, fake, clock = make(core, {"web": [10]})
    asyncio.run(sync.resync())
    clock.now += 2
    asyncio.run(sync.resync())  # periodic: the timeout runs on
    assert sync.registry.table.last_seen(10) == 100.0
    sync.on_disconnect()
    assert not sync.connected
    sync.on_connect()
    asyncio.run(sync.resync())
    assert sync.connected
    assert sync.registry.table.last_seen(10) == 102.0


def test_watcher_level_events_ask_for_a_resync(core: ModuleType) -> None:
    sync, fake, _ = make(core, {"web": [10]})
    asyncio.run(sync.resync())
    assert not sync._wanted.is_set()
    fake.watchers["api"] = [20]
    sync.apply(Event("api", "add", {}))
    assert sync._wanted.is_set()
    asyncio.run(sync.resync())
    assert monitored(sync) == {10, 20}
    del fake.watchers["web"]
    sync.apply(Event("web", "remove", {}))
    asyncio.run(sync.resync())
    assert monitored(sync) == {20}


def test_run_resyncs_retries_until_circusd_answers(core: ModuleType) -> None:
    sync, fake, _ = make(core, {"web": [10]})
    fake.down = True

    async def scenario() -> None:
        task = asyncio.create_task(sync.run_resyncs())
        sync.request_resync(fresh=True)
        await asyncio.sleep(0.1)
        assert not sync.connected
        fake.down = False
        for _ in range(100):  # the back-off starts at 0.25 s
            if sync.connected:
                break
            await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(scenario())
    assert sync.connected and monitored(sync) == {10}
