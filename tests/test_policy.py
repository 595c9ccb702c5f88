"""KillPolicy: the stall, kernel-drop and storm guards, on plain numbers.

The policy is pure: each test hands it the pids that expired on a tick (as the
registry's ``Late`` records), how many pids are monitored and how many are
late, and reads the decision.  ``Fleet`` plays the registry's part: it keeps
the late pids between ticks, as held pids stay late until they beat again.
"""

from __future__ import annotations

import logging
import random
from typing import Any

from circus_watchdog.policy import HOLD_LIMIT, Decision, KillPolicy
from circus_watchdog.registry import Late

T = 3.0  # timeout, seconds
TICK = 0.1


def late(*pids: int, now: float = 0.0, timeout: float = T) -> list[tuple[int, Late]]:
    return [(pid, Late("w", timeout, now - timeout, now)) for pid in pids]


def decide(
    p: KillPolicy, now: float, pids: list[int], monitored: int, **kw: Any
) -> Decision:
    """As the issue writes it: ``monitored`` counts the pids left in the table."""
    expired = late(*pids, now=now)
    return p.decide(
        now, expired, monitored=monitored + len(pids), silent=len(pids), **kw
    )


class Fleet:
    """The registry's part: which pids are late (held ones stay late)."""

    def __init__(self, policy: KillPolicy, size: int, timeout: float = T) -> None:
        self.policy = policy
        self.size = size  # monitored pids (killed ones are respawned at once)
        self.timeout = timeout
        self.late: dict[int, Late] = {}
        self.killed: list[int] = []
        self.held: set[int] = set()

    def expire(self, now: float, pids: list[int]) -> Decision:
        expired = []
        for pid in pids:
            rec = self.late.setdefault(
                pid, Late("w", self.timeout, now - self.timeout, now)
            )
            expired.append((pid, rec))
        d = self.policy.decide(now, expired, monitored=self.size, silent=len(self.late))
        for pid in d.kill:
            del self.late[pid]
            self.killed.append(pid)
            self.held.discard(pid)
        for pid, reason in d.hold:
            if self.late[pid].held_since is None:
                self.late[pid].held_since = now
            self.late[pid].reason = reason
            self.held.add(pid)
        return d

    def resume(self, pid: int) -> None:
        del self.late[pid]
        self.held.discard(pid)


def test_nothing_expired_nothing_to_do() -> None:
    d = KillPolicy(T).decide(10.0, [], monitored=100, silent=0)
    assert d.kill == [] and d.hold == [] and d.examine == []


def test_stalled_tick_kills_nobody() -> None:
    d = decide(KillPolicy(T), 10.0, [1, 2], 100, stalled=True)
    assert d.kill == [] and d.hold == [(1, "stall"), (2, "stall")] and d.stalled


def test_single_hung_process_is_killed() -> None:
    d = decide(KillPolicy(T), 10.0, [1], 3)  # 1 of 4
    assert d.kill == [1] and d.hold == []


def test_whole_watcher_silent_is_held() -> None:
    d = decide(KillPolicy(T), 10.0, [1, 2, 3, 4], 0)  # 4 of 4
    assert d.kill == [] and d.hold == [(p, "storm") for p in (1, 2, 3, 4)]


def test_floor_lets_small_groups_die() -> None:
    assert decide(KillPolicy(T), 10.0, [1, 2], 0).kill == [1, 2]
    assert decide(KillPolicy(T), 10.0, [1, 2, 3], 0).kill == []


def test_guard_off_kills_everyone() -> None:
    d = decide(KillPolicy(T, storm_guard=False), 10.0, [1, 2, 3, 4], 0)
    assert d.kill == [1, 2, 3, 4]


def test_kills_in_one_window_add_up() -> None:
    p = KillPolicy(T)
    assert decide(p, 10.0, [1, 2], 8).kill == [1, 2]  # 2 of 10
    assert decide(p, 11.0, [3, 4], 8).kill == [3, 4]  # 4 of 10
    d = decide(p, 12.0, [5, 6], 8)  # 6 of 10 within 3 s: a storm
    assert d.kill == [] and len(d.hold) == 2


def test_a_dry_run_counts_a_would_be_kill_once() -> None:
    """In a dry run the pid is re-armed, not removed: still silent a timeout
    later, it is silent again, not silent and killed as well (CI: a 2-pid
    fleet, one asleep and one spinning, tripped the guard so)."""
    p = KillPolicy(T, dry_run=True)
    assert decide(p, 10.0, [1], 1).kill == [1]
    # pid 1 again and pid 2, a little later: 2 of 2 silent, as in a real run
    # (1 killed, 2 silent) and under the floor: nothing held.
    d = decide(p, 10.0 + T / 2, [1, 2], 0)
    assert (d.kill, d.hold) == ([1, 2], [])
    real = KillPolicy(T)
    assert decide(real, 10.0, [1], 1).kill == [1]
    assert decide(real, 10.0 + T / 2, [2], 0).kill == [2]


def test_kills_age_out_when_no_storm_is_on() -> None:
    p = KillPolicy(T)
    assert decide(p, 10.0, [1, 2], 8).kill == [1, 2]
    # A window later, with no storm held meanwhile, the kills no longer count.
    assert decide(p, 10.0 + T + 0.1, [3, 4], 2).kill == [3, 4]


def test_issue_sequence_the_second_pair_stays_held() -> None:
    # Five monitored pids, four silenced in two pairs 0.03 s apart: the first
    # pair is within the allowed share, the second is held, and one timeout
    # later (still silent) it must still be held, though the first kills have
    # left the window.
    p = KillPolicy(T)
    f = Fleet(p, 5)
    t0 = 100.0
    assert f.expire(t0, [1, 2]).kill == [1, 2]
    assert f.expire(t0 + 0.03, [3, 4]).hold == [(3, "storm"), (4, "storm")]
    d = f.expire(t0 + T + 0.06, [3, 4])
    assert d.kill == [] and d.hold == [(3, "storm"), (4, "storm")]
    # Silent until the bound: killed then, never before.
    now = t0 + T + 0.06
    while now < t0 + 0.03 + HOLD_LIMIT * T - T:
        now += T + TICK
        assert f.expire(now, [3, 4]).kill == []
    now += T + TICK
    assert f.expire(now, [3, 4]).kill == [3, 4]


def test_issue_sequence_as_plain_calls() -> None:
    # The issue's three calls, with the held pids counted as silent.
    p = KillPolicy(T)
    t0 = 100.0
    assert decide(p, t0, [1, 2], 3).kill == [1, 2]
    assert decide(p, t0 + 0.03, [3, 4], 3).kill == []
    expired = late(3, 4, now=t0 + 0.03)
    for _, rec in expired:
        rec.held_since = t0 + 0.03
    d = p.decide(t0 + T + 0.06, expired, monitored=5, silent=2)
    assert d.kill == [] and len(d.hold) == 2


def test_resumed_pids_are_not_flushed() -> None:
    p = KillPolicy(T)
    f = Fleet(p, 5)
    assert f.expire(100.0, [1, 2]).kill == [1, 2]
    assert f.expire(100.03, [3, 4]).kill == []
    f.resume(3)
    f.resume(4)  # heartbeats are back: nothing left to decide on
    assert f.killed == [1, 2] and f.late == {}
    # A later lone hang (after the storm ended) is killed as usual.
    assert f.expire(100.0 + 3 * T, [5]).kill == [5]


def test_a_storm_with_random_phases_kills_at_most_the_share() -> None:
    # Twenty pids beat every loop_rate with their own phase, then all go
    # silent at once: their expiries spread over a whole loop_rate.  Over the
    # whole storm at most max_kill_fraction of them die; the rest are held
    # until the bound.
    rng = random.Random(14)
    loop_rate, size = 1.0, 20
    timeout = 3 * loop_rate
    for _ in range(20):
        p = KillPolicy(timeout)
        f = Fleet(p, size, timeout)
        phases = {pid: rng.uniform(0, loop_rate) for pid in range(1, size + 1)}
        due = {pid: 10.0 + ph + timeout for pid, ph in phases.items()}
        now = 10.0
        for _ in range(int(HOLD_LIMIT * timeout / TICK)):
            now += TICK
            expiring = sorted(pid for pid, at in due.items() if at < now)
            d = f.expire(now, expiring)
            for pid in expiring:
                del due[pid]
            for pid, _ in d.hold:
                due[pid] = now + timeout  # a fresh deadline
            if now > 10.0 + 4 * timeout:
                break
        assert 0 < len(f.killed) <= size * p.max_kill_fraction
        assert len(f.killed) + len(f.held) == size


def test_staggered_pairs_split_across_ticks() -> None:
    # The simultaneous storm whose expiries a loaded host spreads over two
    # ticks ends as the one that comes on one tick.
    for split in (0, 1, 2):
        p = KillPolicy(T)
        f = Fleet(p, 5)
        pids = [1, 2, 3, 4]
        f.expire(100.0, pids[:split])
        f.expire(100.0 + TICK, pids[split:])
        f.expire(100.0 + T + 2 * TICK, [q for q in pids if q in f.late])
        assert len(f.killed) <= 2, split


def test_hold_is_bounded() -> None:
    p = KillPolicy(T)
    f = Fleet(p, 3)
    now = 100.0
    assert len(f.expire(now, [1, 2, 3]).hold) == 3
    while now + T < 100.0 + HOLD_LIMIT * T:
        now += T
        assert len(f.expire(now, [1, 2, 3]).hold) == 3  # still held
    d = f.expire(100.0 + HOLD_LIMIT * T, [1, 2, 3])
    assert d.kill == [1, 2, 3] and d.hold == []


def test_holds_use_each_pids_own_timeout() -> None:
    # A watcher whose timeout (10 s) is over three times the global one: its
    # held pids come back every 10 s, and the hold is bounded by its own.
    p = KillPolicy(T)
    f = Fleet(p, 4, timeout=10.0)
    now, killed_at = 0.0, None
    for _ in range(HOLD_LIMIT + 2):
        now += 10.1
        if f.expire(now, [1, 2, 3, 4]).kill:
            killed_at = now
            break
    assert killed_at is not None and killed_at >= HOLD_LIMIT * 10.0


def test_fraction_is_configurable() -> None:
    p = KillPolicy(T, max_kill_fraction=1.0, storm_floor=0)
    assert decide(p, 10.0, [1, 2, 3, 4], 0).kill == [1, 2, 3, 4]
    p = KillPolicy(T, max_kill_fraction=0.1, storm_floor=0)
    assert len(decide(p, 10.0, [1, 2], 9).hold) == 2  # 2 of 11 > 10%


def test_kernel_drops_hold_without_a_stall_warning(caplog: Any) -> None:
    caplog.set_level(logging.WARNING, "circus.watchdog")
    d = decide(KillPolicy(T), 10.0, [1, 2], 100, dropped=5)
    assert d.kill == [] and d.hold == [(1, "kernel_drops"), (2, "kernel_drops")]
    assert not d.stalled
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "kernel dropped 5" in messages[0]
    assert "stalled" not in messages[0]


def test_with_evidence_late_pids_are_examined_but_not_past_the_bound() -> None:
    p = KillPolicy(T, evidence=True)
    expired = late(1, 2, now=100.0)
    expired[1][1].held_since = 100.0 - HOLD_LIMIT * T
    d = p.decide(100.0, expired, monitored=10, silent=2)
    assert d.examine == [1] and d.kill == [2]


def test_dry_run_decides_but_marks_it() -> None:
    d = decide(KillPolicy(T, dry_run=True), 10.0, [1], 100)
    assert d.kill == [1] and d.dry_run


def test_a_stall_mid_evidence_watches_on_instead_of_holding() -> None:
    expired = late(1, 2, now=10.0)
    expired[1][1].reading = "first reading"
    d = KillPolicy(T, evidence=True).decide(
        10.0, expired, monitored=10, silent=2, stalled=True
    )
    assert d.hold == [(1, "stall")] and d.watch == [2] and d.kill == []


def test_storm_holds_last_as_the_storm_ebbs() -> None:
    # The flush of issue 14's real test: eight pids, six silent; three are
    # killed before the guard trips, three held.  Two held ones resume: one
    # silent + three kills is no longer over half of eight, yet the last held
    # pid stays held (it may be about to beat) until it beats or the bound.
    p = KillPolicy(T)
    f = Fleet(p, 8)
    t0 = 100.0
    assert f.expire(t0, [1, 2]).kill == [1, 2]
    assert f.expire(t0 + TICK, [3]).kill == [3]  # 3 of 8: within the share
    assert f.expire(t0 + 2 * TICK, [4, 5, 6]).hold == [
        (p_, "storm") for p_ in (4, 5, 6)
    ]
    f.resume(4)
    f.resume(5)
    now = t0 + 2 * TICK
    while now + T + TICK < t0 + 2 * TICK + HOLD_LIMIT * T:
        now += T + TICK
        d = f.expire(now, [6])
        assert d.kill == [] and d.hold == [(6, "storm")], now
    # A real hang among the held ones is killed at the bound.
    now += T + TICK
    assert f.expire(now, [6]).kill == [6]
    assert f.killed == [1, 2, 3, 6]


def test_a_storm_hold_survives_a_stalled_tick_and_kernel_drops() -> None:
    p = KillPolicy(T)
    f = Fleet(p, 5)
    assert f.expire(100.0, [1, 2, 3, 4]).hold  # a storm: all held
    for pid in (1, 2, 3):
        f.resume(pid)
    expired = [(4, f.late[4])]
    d = p.decide(100.0 + T, expired, monitored=5, silent=1, stalled=True)
    assert d.hold == [(4, "storm")]
    d = p.decide(100.0 + T, expired, monitored=5, silent=1, dropped=3)
    assert d.hold == [(4, "storm")]
    assert f.expire(100.0 + 2 * T, [4]).hold == [(4, "storm")]


def test_after_the_storm_a_lone_hang_is_killed_on_time() -> None:
    p = KillPolicy(T, evidence=True)
    f = Fleet(p, 5)
    assert f.expire(100.0, [1, 2]).examine == [1, 2]
    p.killed(100.0 + TICK, 2)  # killed on evidence
    f.late.pop(1), f.late.pop(2)
    assert len(f.expire(100.0 + TICK, [3, 4]).hold) == 2
    f.resume(3)
    f.resume(4)  # the storm is over: its last hold was made at 100.1
    # Two timeouts after the last storm hold its kills age out: a lone hang is
    # examined (then killed) at its timeout, not held.
    d = f.expire(100.0 + TICK + 2 * T, [5])
    assert d.examine == [5] and d.hold == []


def test_storm_line_counts_silent_and_killed_of_one_fleet(caplog: Any) -> None:
    caplog.set_level(logging.ERROR, "circus.watchdog")
    p = KillPolicy(T)
    assert decide(p, 10.0, [1, 2], 3).kill == [1, 2]  # 2 of 5
    # The two killed pids left the table (3 monitored): they still count as
    # monitored, else 2 silent + 2 killed would read "4 of 3".
    d = p.decide(10.1, late(3, 4, now=10.1), monitored=3, silent=2)
    assert len(d.hold) == 2
    (line,) = [r.getMessage() for r in caplog.records]
    assert "4 of 5 monitored pids are silent now or were killed within 3 s" in line
    assert "(2 silent, 2 killed)" in line


def test_two_hangs_and_a_starved_pid_in_seven_are_no_storm() -> None:
    # The real starved test: seven pids; a starved one is held, then two hung
    # ones are killed on evidence.  1 silent + 2 killed is 3 of 7, not a
    # storm, though the killed pids have left the table.
    p = KillPolicy(T, evidence=True)
    starved = late(7, now=10.0)
    starved[0][1].reason, starved[0][1].held_since = "starved", 10.0
    assert p.decide(10.0, late(5, 6, now=10.0), monitored=7, silent=3).examine == [5, 6]
    p.killed(10.2, 2)
    d = p.decide(10.3, starved, monitored=5, silent=1)
    assert d.examine == [7] and d.hold == []
