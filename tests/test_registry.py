"""The registry on plain data: listings, events and the kill path (no circusd)."""

from __future__ import annotations

from types import ModuleType

import pytest

from circus_watchdog.registry import Registry
from fake_circusd import config

T0 = 100.0


@pytest.fixture
def registry(core: ModuleType) -> Registry:
    cfg = config(loop_rate="1", max_count="3", watcher_timeouts="slow=10")
    return Registry(core.HeartbeatTable(cfg.timeout, cfg.tick), cfg, self_pids=[42])


def monitored(registry: Registry) -> dict[int, str]:
    table = registry.table
    return {pid: table.watcher_of(pid) for pid in sorted(table.pids())}


def test_listing_monitors_matching_watchers_only(core: ModuleType) -> None:
    cfg = config(watchers_regex="^(web|worker)$")
    registry = Registry(core.HeartbeatTable(cfg.timeout, cfg.tick), cfg, self_pids=[])
    registry.apply_listing({"web": [10, 11], "worker": [12]}, T0, fresh=True)
    assert monitored(registry) == {10: "web", 11: "web", 12: "worker"}
    assert registry.watchers == ("web", "worker")
    assert not registry.matches("other")


def test_circus_own_watchers_are_excluded_unless_included(core: ModuleType) -> None:
    listing = {"web": [10], "circusd-stats": [20], "plugin:flapping": [21]}
    for include, expected in (
        ("false", {10: "web"}),
        ("true", {10: "web", 20: "circusd-stats", 21: "plugin:flapping"}),
    ):
        cfg = config(include_circus=include)
        table = core.HeartbeatTable(cfg.timeout, cfg.tick)
        registry = Registry(table, cfg, self_pids=[])
        registry.apply_listing(listing, T0, fresh=True)
        assert monitored(registry) == expected
    registry.apply_event("circusd-stats", "spawn", 22, T0)  # included: learnt
    assert 22 in registry.table


def test_excluded_watchers_are_counted(registry: Registry) -> None:
    registry.apply_listing(
        {"web": [10], "circusd-stats": [20], "plugin:watchdog": [42]}, T0, fresh=True
    )
    assert registry.excluded == {"circusd-stats": 1, "plugin:watchdog": 1}
    registry.apply_event("circusd-stats", "spawn", 23, T0)
    assert 23 not in registry.table


def test_the_watcher_running_us_is_never_monitored(registry: Registry) -> None:
    registry.apply_listing({"web": [10], "watchdog": [42, 43]}, T0, fresh=True)
    assert monitored(registry) == {10: "web"}
    assert registry.excluded == {"watchdog": 2}
    registry.apply_event("watchdog", "spawn", 44, T0 + 1)  # its next process
    assert 44 not in registry.table


def test_our_own_spawn_event_excludes_our_watcher(registry: Registry) -> None:
    registry.apply_event("wd", "spawn", 42, T0)
    registry.apply_event("wd", "spawn", 50, T0)
    assert len(registry.table) == 0


def test_an_event_during_a_listing_wins(registry: Registry) -> None:
    registry.apply_listing({"web": [10, 11]}, T0, fresh=True)
    registry.begin_listing()
    # While `list` is in flight: 11 is reaped and 12 spawned; the listing,
    # read before both, still shows 11 and not 12.
    registry.apply_event("web", "reap", 11, T0 + 1)
    registry.apply_event("web", "spawn", 12, T0 + 1)
    registry.apply_listing({"web": [10, 11]}, T0 + 2, fresh=False)
    assert monitored(registry) == {10: "web", 12: "web"}


def test_a_failed_listing_forgets_its_churn(registry: Registry) -> None:
    registry.apply_listing({"web": [10, 11]}, T0, fresh=True)
    registry.begin_listing()
    registry.apply_event("web", "reap", 11, T0 + 1)
    registry.abort_listing()
    registry.apply_listing({"web": [10, 11]}, T0 + 2, fresh=False)
    assert monitored(registry) == {10: "web", 11: "web"}  # circusd knows best


def test_a_killed_pid_still_listed_is_not_relearnt(registry: Registry) -> None:
    registry.apply_listing({"web": [10, 11]}, T0, fresh=True)
    registry.start_kill(10, "web")  # the policy chose it
    assert registry.killing == [10]
    registry.apply_listing({"web": [10, 11]}, T0 + 4, fresh=True)  # being killed
    assert 10 not in registry.table
    registry.end_kill(10)
    assert registry.killing == []
    registry.apply_listing({"web": [10, 11]}, T0 + 5, fresh=True)  # still listed
    assert 10 not in registry.table
    registry.apply_listing({"web": [11]}, T0 + 6, fresh=False)  # circusd forgot it
    registry.apply_listing({"web": [10, 11]}, T0 + 7, fresh=False)  # pid reused
    assert 10 in registry.table


def test_a_reused_pid_spawned_again_is_monitored(registry: Registry) -> None:
    registry.apply_listing({"web": [10]}, T0, fresh=True)
    registry.start_kill(10, "web")
    registry.end_kill(10)
    registry.rearm(10, T0 + 4)  # a late re-arm cannot bring it back
    assert 10 not in registry.table
    registry.apply_event("web", "spawn", 10, T0 + 5)
    assert monitored(registry) == {10: "web"}


def test_fresh_listing_restarts_every_timeout(registry: Registry) -> None:
    registry.apply_listing({"web": [10]}, T0, fresh=True)
    registry.apply_listing({"web": [10]}, T0 + 2, fresh=False)
    assert registry.table.last_seen(10) == T0
    registry.apply_listing({"web": [10]}, T0 + 2, fresh=True)  # a reconnection
    assert registry.table.last_seen(10) == T0 + 2


def test_watchers_added_and_removed(registry: Registry) -> None:
    registry.apply_listing({"web": [10]}, T0, fresh=True)
    registry.apply_listing({"web": [10], "api": [20, 21]}, T0 + 1, fresh=False)
    assert monitored(registry) == {10: "web", 20: "api", 21: "api"}
    registry.apply_listing({"api": [20, 21]}, T0 + 2, fresh=False)
    assert monitored(registry) == {20: "api", 21: "api"}
    assert registry.watchers == ("api",)


def test_per_watcher_timeouts_are_set(registry: Registry) -> None:
    registry.apply_listing({"slow": [10], "web": [11]}, T0, fresh=True)
    assert registry.table.watcher_timeout("slow") == 10
    assert registry.table.watcher_timeout("web") == 3
    assert [(p, late.watcher) for p, late in registry.expire(T0 + 3.5)] == [(11, "web")]


# -- late pids: expiry, re-arms, holds, resumption --------------------------------


def test_the_registry_owns_expiry(registry: Registry) -> None:
    registry.apply_listing({"web": [10, 11], "slow": [12]}, T0, fresh=True)
    registry.table.beat(11, T0 + 2)
    expired = registry.expire(T0 + 3.5)
    assert [p for p, _ in expired] == [10]
    ((pid, late),) = expired
    # Out of the table, but not unknown: late, with its watcher's timeout
    # (the table's: one source) and its last heartbeat.
    assert 10 not in registry.table and registry.late(10) is late
    assert (late.watcher, late.timeout, late.since) == ("web", 3.0, T0 + 0.5)
    assert registry.late_count == 1 and registry.killing == []
    registry.rearm(10, T0 + 3.5)
    assert 10 in registry.table and registry.late_count == 1


def test_a_rearmed_pid_is_late_until_it_beats(registry: Registry) -> None:
    registry.apply_listing({"web": [10]}, T0, fresh=True)
    registry.expire(T0 + 3.5)
    registry.rearm(10, T0 + 3.5)
    assert registry.resumed() == []
    # /status's age: the real time since its last heartbeat, not since the
    # re-arm.
    assert registry.last_heartbeat(10) == T0 + 0.5
    assert registry.hold(10, "storm", T0 + 3.5) is True
    assert registry.hold(10, "storm", T0 + 6.6) is False  # the same hold
    assert [p for p, _ in registry.held()] == [10]
    # Silent again: it expires again, still the same late record.
    again = registry.expire(T0 + 6.7)
    assert [p for p, _ in again] == [10] and again[0][1].held_since == T0 + 3.5
    registry.rearm(10, T0 + 6.7)
    registry.table.beat(10, T0 + 7.0)
    back = registry.resumed()
    assert [(p, late.reason) for p, late in back] == [(10, "storm")]
    assert registry.late(10) is None and registry.held() == []
    assert registry.last_heartbeat(10) == T0 + 7.0


def test_late_pids_leave_with_their_process(registry: Registry) -> None:
    registry.apply_listing({"web": [10, 11, 12]}, T0, fresh=True)
    registry.expire(T0 + 3.5)
    for pid in (10, 11, 12):
        registry.rearm(pid, T0 + 3.5)
    registry.apply_event("web", "reap", 10, T0 + 4)
    registry.apply_listing({"web": [12]}, T0 + 4, fresh=False)  # 11 gone
    assert registry.late(10) is None and registry.late(11) is None
    assert registry.late_count == 1
    registry.start_kill(12, "web")
    assert registry.late_count == 0 and 12 not in registry.table
    registry.apply_listing({"web": [13]}, T0 + 5, fresh=False)
    registry.expire(T0 + 8.6)
    registry.apply_listing({"web": [13]}, T0 + 9, fresh=True)  # reconnected
    assert registry.late_count == 0  # every timeout restarts


def test_a_listing_does_not_restart_a_late_pid(registry: Registry) -> None:
    # Expired, out of the table while it is examined: a listing that finds it
    # does not add it back, which would pass for a heartbeat (CI: a hung pid
    # held as traced had its silence restarted by an unknown-pid re-sync).
    registry.apply_listing({"web": [10, 11]}, T0, fresh=True)
    registry.table.beat(11, T0 + 3)
    registry.expire(T0 + 3.5)
    assert 10 not in registry.table and registry.late(10) is not None
    assert registry.apply_listing({"web": [10, 11]}, T0 + 3.6, fresh=False) == 0
    assert registry.apply_watcher("web", [10, 11], T0 + 3.7) == 0
    assert 10 not in registry.table
    registry.rearm(10, T0 + 3.8)
    assert registry.resumed() == []
    assert registry.last_heartbeat(10) == T0 + 0.5
    # A fresh listing (a reconnection) still restarts every timeout.
    registry.expire(T0 + 6.9)
    registry.apply_listing({"web": [10, 11]}, T0 + 7, fresh=True)
    assert 10 in registry.table and registry.late(10) is None


def test_an_evidence_window_rearms_for_a_tick(registry: Registry) -> None:
    registry.apply_listing({"web": [10]}, T0, fresh=True)
    registry.expire(T0 + 3.5)
    registry.rearm(10, T0 + 3.5, window=0.1, reading="first")
    assert registry.late(10).reading == "first"  # type: ignore[union-attr]
    assert registry.expire(T0 + 3.55) == []
    assert [p for p, _ in registry.expire(T0 + 3.65)] == [10]


def test_events_with_bad_pids_are_ignored(registry: Registry) -> None:
    for pid in (None, "10", 0, -1, 2**31, True, 1.5):
        registry.apply_event("web", "spawn", pid, T0)
    assert len(registry.table) == 0
    registry.apply_listing({"web": [None, "x", 0, 10, 2**40]}, T0, fresh=True)
    assert monitored(registry) == {10: "web"}
