"""KillPolicy: the stall guard and the storm guard, on plain numbers."""

from __future__ import annotations

from circus_watchdog.policy import HOLD_LIMIT, KillPolicy

T = 3.0  # timeout, seconds


def silent(*pids: int) -> list[tuple[int, str]]:
    return [(pid, "w") for pid in pids]


def test_nothing_silent_nothing_to_do() -> None:
    d = KillPolicy(T).decide(10.0, [], 100)
    assert d.kill == [] and d.rearm == [] and d.held == 0


def test_stalled_tick_kills_nobody() -> None:
    d = KillPolicy(T).decide(10.0, silent(1, 2), 100, stalled=True)
    assert d.kill == [] and d.rearm == silent(1, 2) and d.held == 0


def test_single_hung_process_is_killed() -> None:
    d = KillPolicy(T).decide(10.0, silent(1), 3)  # 1 of 4
    assert d.kill == silent(1) and d.rearm == []


def test_whole_watcher_silent_is_held() -> None:
    d = KillPolicy(T).decide(10.0, silent(1, 2, 3, 4), 0)  # 4 of 4
    assert d.kill == [] and d.rearm == silent(1, 2, 3, 4) and d.held == 4


def test_floor_lets_small_groups_die() -> None:
    assert KillPolicy(T).decide(10.0, silent(1, 2), 0).kill == silent(1, 2)
    assert KillPolicy(T).decide(10.0, silent(1, 2, 3), 0).kill == []


def test_guard_off_kills_everyone() -> None:
    d = KillPolicy(T, storm_guard=False).decide(10.0, silent(1, 2, 3, 4), 0)
    assert d.kill == silent(1, 2, 3, 4)


def test_kills_in_one_window_add_up() -> None:
    p = KillPolicy(T)
    assert p.decide(10.0, silent(1, 2), 8).kill == silent(1, 2)  # 2 of 10
    assert p.decide(11.0, silent(3, 4), 8).kill == silent(3, 4)  # 4 of 10
    d = p.decide(12.0, silent(5, 6), 8)  # 6 of 10 within 3 s: a storm
    assert d.kill == [] and d.held == 2
    # Once the window has passed, the earlier kills no longer count.
    assert p.decide(12.0 + T + 0.1, silent(5), 9).kill == silent(5)


def test_hold_is_bounded() -> None:
    p = KillPolicy(T)
    now = 100.0
    assert p.decide(now, silent(1, 2, 3), 0).held == 3
    # Held pids get a fresh timeout, so they come back every timeout.
    while now + T < 100.0 + HOLD_LIMIT * T:
        now += T
        assert p.decide(now, silent(1, 2, 3), 0).held == 3  # still held
    now = 100.0 + HOLD_LIMIT * T
    d = p.decide(now, silent(1, 2, 3), 0)
    assert d.kill == silent(1, 2, 3) and d.held == 0


def test_a_pid_that_resumed_gets_a_new_hold() -> None:
    p = KillPolicy(T)
    assert p.decide(100.0, silent(1, 2, 3), 0).held == 3
    # They resumed; a second storm much later holds them again, from scratch.
    later = 100.0 + (HOLD_LIMIT + 5) * T
    d = p.decide(later, silent(1, 2, 3), 0)
    assert d.kill == [] and d.held == 3


def test_fraction_is_configurable() -> None:
    p = KillPolicy(T, max_kill_fraction=1.0, storm_floor=0)
    assert p.decide(10.0, silent(1, 2, 3, 4), 0).kill == silent(1, 2, 3, 4)
    p = KillPolicy(T, max_kill_fraction=0.1, storm_floor=0)
    assert p.decide(10.0, silent(1, 2), 9).held == 2  # 2 of 11 > 10%
