"""Sync against a fake circusd: re-syncs, events, "connected" (no circusd)."""

from __future__ import annotations

import asyncio
import logging
from types import ModuleType

import pytest

from circus_watchdog import sync as sync_module
from circus_watchdog.circusd import CircusError, Event
from circus_watchdog.metrics import Metrics
from circus_watchdog.registry import Registry
from circus_watchdog.sync import GATHER, SETTLE, WARN_INTERVAL, Sync
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


def full_listings(fake: FakeCircusd) -> int:
    return fake.calls.count(("list", {}))


def watcher_listings(fake: FakeCircusd, name: str) -> int:
    return fake.calls.count(("list", {"name": name}))


async def settled(sync: Sync, want: set[int], limit: float = 1.0) -> float:
    """Seconds until the monitored set is ``want``; AssertionError after
    ``limit``."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for _ in range(int(limit / 0.01) + 1):
        if monitored(sync) == want:
            return loop.time() - start
        await asyncio.sleep(0.01)
    raise AssertionError(f"monitored {monitored(sync)}, not {want}, after {limit} s")


def running(sync: Sync, scenario):  # type: ignore[no-untyped-def]
    """Run ``scenario`` beside run_resyncs, after its first re-sync."""

    async def main() -> None:
        task = asyncio.create_task(sync.run_resyncs())
        for _ in range(100):
            if sync.connected:
                break
            await asyncio.sleep(0.01)
        try:
            await scenario()
        finally:
            task.cancel()

    asyncio.run(main())


def test_watcher_events_list_that_watcher_alone(core: ModuleType) -> None:
    sync, fake, _ = make(core, {"web": [10], "db": [11]})

    async def scenario() -> None:
        fake.calls.clear()
        fake.watchers["api"] = [20]
        for action in ("add", "start", "updated"):  # gathered: one listing
            sync.apply(Event("api", action, {}))
        await settled(sync, {10, 11, 20})
        await asyncio.sleep(SETTLE + 0.2)  # found: not listed again
        assert watcher_listings(fake, "api") == 1
        del fake.watchers["web"]
        sync.apply(Event("web", "remove", {}))
        await settled(sync, {11, 20})
        await asyncio.sleep(SETTLE + 0.2)  # not found: once more, then done
        assert watcher_listings(fake, "web") == 2
        await asyncio.sleep(SETTLE + 0.2)
        assert watcher_listings(fake, "web") == 2
        assert full_listings(fake) == 0
        assert fake.calls.count(("list", {"name": "db"})) == 0

    running(sync, scenario)


def test_starting_50_watchers_costs_one_small_listing_each(core: ModuleType) -> None:
    # circusd starting a fleet: each watcher's `start` event.  A full re-sync
    # per event would cost circusd 50 x 51 calls.
    sync, fake, _ = make(core, {})

    async def scenario() -> None:
        fake.calls.clear()
        want = set()
        for i in range(50):
            fake.watchers[f"w{i}"] = [100 + i]
            want.add(100 + i)
            sync.apply(Event(f"w{i}", "start", {}))
            await asyncio.sleep(0.005)
        await settled(sync, want)
        await asyncio.sleep(SETTLE + 0.2)
        assert full_listings(fake) == 0
        assert len(fake.calls) == 50, fake.calls

    running(sync, scenario)


def test_circusd_starting_listed_watchers_answers_no_more_listings(
    core: ModuleType,
) -> None:
    # circusd loads its watchers, then starts them: the first re-sync found
    # them empty, and their spawn events bring the pids.  Listing each one
    # again on `start` would cost circusd a /proc read per process.
    names = [f"w{i}" for i in range(50)]
    sync, fake, _ = make(core, dict.fromkeys(names, []))

    async def scenario() -> None:
        fake.calls.clear()
        for i, name in enumerate(names):
            for pid in range(1000 + 10 * i, 1010 + 10 * i):
                fake.watchers[name].append(pid)
                sync.apply(Event(name, "spawn", {"process_pid": pid}))
            sync.apply(Event(name, "start", {}))
        assert await settled(sync, set(range(1000, 1500))) < 0.1
        await asyncio.sleep(SETTLE + 0.2)
        assert fake.calls == []
        # A watcher the last listing did not find is listed on `start`.
        del fake.watchers["w0"]
        sync.apply(Event("w0", "stop", {}))
        await settled(sync, set(range(1010, 1500)))
        fake.watchers["w0"] = [2000]
        sync.apply(Event("w0", "start", {}))
        await settled(sync, {2000, *range(1010, 1500)})

    running(sync, scenario)


def test_a_watcher_that_reloadconfig_recreates_is_monitored_within_a_second(
    core: ModuleType,
) -> None:
    # reloadconfig re-creates a changed watcher: the old one stops and leaves
    # circusd's list, the new one spawns and sends `start` before circusd
    # registers it, so a listing taken on `start` finds no such watcher.
    sync, fake, _ = make(core, {"web": [10], "api": [20]})

    async def scenario() -> None:
        for _ in range(3):
            old = fake.watchers.pop("api")
            sync.apply(Event("api", "stop", {}))
            for pid in old:
                sync.apply(Event("api", "reap", {"process_pid": pid}))
            new = [old[0] + 1]
            sync.apply(Event("api", "spawn", {"process_pid": new[0]}))
            sync.apply(Event("api", "start", {}))
            await asyncio.sleep(GATHER * 3)  # listed: not found
            fake.watchers["api"] = new  # registered, no event says so
            assert await settled(sync, {10, *new}) < 1.0

    running(sync, scenario)


def test_unknown_pids_ask_for_a_rate_limited_resync(core: ModuleType) -> None:
    sync, fake, _ = make(core, {"web": [10]})

    async def scenario() -> None:
        fake.watchers["web"].append(11)  # its spawn event was lost
        sync.unknown_seen()  # and it beats: the receiver says so
        await settled(sync, {10, 11})
        fake.calls.clear()
        # Forged pids for 3 s: at most one re-sync per UNKNOWN_RELIST (2 s),
        # fewer as they find nothing.
        for _ in range(60):
            sync.unknown_seen()
            await asyncio.sleep(0.05)
        assert 1 <= full_listings(fake) <= 2, fake.calls

    running(sync, scenario)


def test_unknown_pids_beside_spawn_events_wait_for_them(
    core: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    # circusd starting beating processes: each may beat before its spawn
    # event is applied.  Those reports ask no re-sync while spawns go on, up
    # to UNKNOWN_DEFER; a pid whose event was lost is learnt once they stop.
    monkeypatch.setattr(sync_module, "UNKNOWN_QUIET", 0.2)
    monkeypatch.setattr(sync_module, "UNKNOWN_DEFER", 0.8)
    monkeypatch.setattr(sync_module, "UNKNOWN_RELIST", 0.3)
    sync, fake, _ = make(core, {"web": [10]})

    async def spawning(first: int, seconds: float) -> None:
        for i in range(int(seconds / 0.02)):  # a spawn every 20 ms
            pid = first + i
            fake.watchers["web"].append(pid)
            sync.apply(Event("web", "spawn", {"process_pid": pid}))
            sync.unknown_seen()  # it beat before that: the tick reports it
            await asyncio.sleep(0.02)

    async def scenario() -> None:
        fake.calls.clear()
        await spawning(100, 0.5)
        assert full_listings(fake) == 0, fake.calls
        fake.watchers["web"].append(11)  # its spawn event was lost
        await asyncio.sleep(0.1)  # within UNKNOWN_QUIET of the last spawn
        sync.unknown_seen()
        await asyncio.sleep(0.05)
        assert full_listings(fake) == 0, fake.calls
        await asyncio.sleep(0.2)  # quiet: its next beat asks
        sync.unknown_seen()
        await settled(sync, {10, 11, *range(100, 125)})
        assert full_listings(fake) == 1, fake.calls
        # Spawns that never stop: a re-sync every UNKNOWN_DEFER at most.
        fake.calls.clear()
        await spawning(200, 1.2)
        assert full_listings(fake) == 1, fake.calls
        # A pause, then more spawns: the bound starts afresh, nothing asks.
        await asyncio.sleep(0.3)
        fake.calls.clear()
        await spawning(300, 0.5)
        assert full_listings(fake) == 0, fake.calls

    running(sync, scenario)


def test_a_watcher_listing_follows_that_watcher_only(core: ModuleType) -> None:
    sync, fake, _ = make(core, {"web": [10, 11], "db": [12]}, watchers_regex="web|db")
    asyncio.run(sync.resync())
    sync.registry.table.remove(11)  # the killer takes it out of the table
    sync.registry.start_kill(11, "web")
    sync.registry.end_kill(11)  # killed, still listed by circusd
    fake.watchers["web"] = [11, 13]  # 10 died unseen; 13 spawned unseen
    fake.watchers["db"] = [14]
    asyncio.run(sync.relist("web"))
    assert monitored(sync) == {12, 13}  # db untouched, 11 not re-learnt
    del fake.watchers["web"]
    asyncio.run(sync.relist("web"))  # gone: nothing of it left
    assert monitored(sync) == {12} and sync.registry.watchers == ("db",)


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
