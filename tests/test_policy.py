"""KillPolicy: the stall guard and the storm guard, on plain numbers."""

from __future__ import annotations

import logging
from typing import Any

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


def test_holds_use_each_pids_own_timeout() -> None:
    # A watcher whose timeout (10 s) is over twice the global one (3 s): its
    # held pids come back every 10 s, and the hold must still be bounded.
    p = KillPolicy(T, timeout_of=lambda w: 10.0 if w == "slow" else T)
    pids = [(n, "slow") for n in (1, 2, 3, 4)]
    now, killed_at = 0.0, None
    for _ in range(HOLD_LIMIT + 2):
        now += 10.1  # silent again one timeout (and a tick) later
        if p.decide(now, pids, 0).kill:
            killed_at = now
            break
    assert killed_at is not None and killed_at >= HOLD_LIMIT * 10.0


def test_kernel_drops_hold_without_a_stall_warning(caplog: Any) -> None:
    caplog.set_level(logging.WARNING, "circus.watchdog")
    d = KillPolicy(T).decide(10.0, silent(1, 2), 100, dropped=5)
    assert d.kill == [] and d.rearm == silent(1, 2) and not d.stalled
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "kernel dropped 5" in messages[0]
    assert "stalled" not in messages[0]


def test_dry_run_decides_but_marks_it() -> None:
    d = KillPolicy(T, dry_run=True).decide(10.0, silent(1), 100)
    assert d.kill == silent(1) and d.dry_run
