"""The engine's tick on fakes: holds, their log lines, /status and metrics.

A `Watchdog` built on made-up endpoints is never run: the test calls ``tick``
with its own clock, beats pids in the table by hand, and a fake killer records
what would be killed.  Real circusd runs are in test_engine.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from circus_watchdog import engine, evidence, holds
from circus_watchdog.diagnostics import Why
from circus_watchdog.evidence import MIN_WINDOW, Examiner
from circus_watchdog.policy import HOLD_LIMIT
from fake_circusd import config
from procs import fake_stat
from support import free_udp_port
from test_evidence import fake_proc, fake_task

T0 = 1000.0
TIMEOUT = 3.0  # loop_rate 1 x max_count 3
TICK = 0.1


class FakeKiller:
    """Records kills; takes the pid from the registry as the real one does."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry
        self.kills: list[tuple[int, str, Why, bool]] = []

    def kill(self, pid: int, watcher: str, why: Why, *, dry_run: bool) -> None:
        self.kills.append((pid, watcher, why, dry_run))
        if not dry_run:
            self.registry.start_kill(pid, watcher)
            self.registry.end_kill(pid)

    async def close(self) -> None:
        pass


@pytest.fixture
def make() -> Iterator[Any]:
    made: list[engine.Watchdog] = []

    def build(pids: dict[str, list[int]], **opts: str) -> engine.Watchdog:
        wd = engine.Watchdog(config(loop_rate="1", max_count="3", **opts))
        wd.killer = FakeKiller(wd.registry)  # type: ignore[assignment]
        wd.sync.connected = True
        wd.registry.apply_listing(pids, T0, fresh=True)
        made.append(wd)
        return wd

    yield build
    for wd in made:
        wd.client._context.term()


def run_ticks(wd: engine.Watchdog, start: float, end: float) -> float:
    now = start
    for _ in range(int((end - start) / TICK) + 1):
        now += TICK
        if now > end:
            break
        wd.tick(now)
    return now


def beat(wd: engine.Watchdog, now: float, *pids: int) -> None:
    for pid in pids:
        wd.table.beat(pid, now)


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def test_a_storm_hold_is_visible_and_its_end_logged_once(
    make: Any, caplog: pytest.LogCaptureFixture
) -> None:
    wd = make({"web": [10, 11, 12, 13]})
    caplog.set_level(logging.WARNING, "circus.watchdog")
    now = run_ticks(wd, T0, T0 + TIMEOUT + 0.25)  # all silent: a storm
    assert wd.killer.kills == []  # type: ignore[attr-defined]
    holds = {h["pid"]: h for h in wd.status(now)["holds"]}
    assert sorted(holds) == [10, 11, 12, 13]
    assert {h["reason"] for h in holds.values()} == {"storm"}
    assert wd.metrics.kills_held["storm"] == 4
    started = [m for m in messages(caplog) if m.startswith("holding web pid")]
    assert started[0] == (
        "holding web pid 10: storm, 4 of 4 monitored pids are silent now or "
        "were killed within 3 s"
    )
    assert len(started) == 4
    # Silent on: each comes back every timeout, held again, logged once only.
    now = run_ticks(wd, now, now + 2 * TIMEOUT)
    assert wd.metrics.kills_held["storm"] == 12
    assert len([m for m in messages(caplog) if m.startswith("holding")]) == 4
    # /status age is the real silence, not the time since the fresh deadline.
    ages = [p["age"] for p in wd.status(now)["pids"]]
    assert len(ages) == 4 and all(age > 3 * TIMEOUT for age in ages)
    assert all(h["silent_for"] > 3 * TIMEOUT for h in wd.status(now)["holds"])
    beat(wd, now, 10, 11, 12, 13)
    now = run_ticks(wd, now, now + 2 * TICK)
    ended = [m for m in messages(caplog) if "ended: resumed" in m]
    assert len(ended) == 4 and ended[0].startswith("hold of web pid 10 ended")
    assert wd.status(now)["holds"] == [] and wd.killer.kills == []  # type: ignore[attr-defined]
    assert all(p["age"] < 3 * TICK for p in wd.status(now)["pids"])


def test_status_age_after_a_hold_is_the_real_silence(make: Any) -> None:
    wd = make({"web": [10, 11, 12, 13]})
    now = run_ticks(wd, T0, T0 + TIMEOUT + 0.25)
    since = wd.registry.last_heartbeat(10)
    assert since == pytest.approx(T0, abs=TICK + 1e-9)
    status_pid = {p["pid"]: p for p in wd.status(now)["pids"]}[10]
    assert status_pid["age"] == pytest.approx(now - since)
    assert status_pid["age"] > TIMEOUT  # not the 0.2 s since its fresh deadline
    hold = {h["pid"]: h for h in wd.status(now)["holds"]}[10]
    assert hold["since"] == pytest.approx(T0 + TIMEOUT, abs=2 * TICK)
    assert hold["silent_for"] == pytest.approx(now - since)


def test_a_held_pid_is_killed_at_the_bound_with_the_hold_in_its_line(
    make: Any,
) -> None:
    wd = make({"web": [10, 11, 12, 13]})
    now = run_ticks(wd, T0, T0 + (HOLD_LIMIT + 2) * (TIMEOUT + TICK))
    kills = wd.killer.kills  # type: ignore[attr-defined]
    assert sorted(k[0] for k in kills) == [10, 11, 12, 13]
    for _, _, why, dry_run in kills:
        assert not dry_run and why.timeout == TIMEOUT
        assert "(storm)" in why.detail and why.detail.startswith("held ")
        assert why.silent_for >= HOLD_LIMIT * TIMEOUT
    assert wd.registry.late_count == 0 and wd.status(now)["holds"] == []


def test_a_lone_hang_is_killed_on_time(make: Any) -> None:
    wd = make({"web": [10, 11, 12, 13]})
    now = T0
    for _ in range(int((TIMEOUT + 0.3) / TICK)):
        now += TICK
        beat(wd, now, 11, 12, 13)
        wd.tick(now)
    kills = wd.killer.kills  # type: ignore[attr-defined]
    assert [(k[0], k[1]) for k in kills] == [(10, "web")]
    why = kills[0][2]
    assert why.detail == "" and TIMEOUT <= why.silent_for <= TIMEOUT + TICK
    assert sum(wd.metrics.kills_held.values()) == 0


def test_a_stalled_tick_holds_for_stall(make: Any) -> None:
    wd = make({"web": [10]})
    wd.tick(T0 + TIMEOUT + 0.5, late=True)
    assert wd.killer.kills == [] and wd.metrics.stalls == 1  # type: ignore[attr-defined]
    assert wd.metrics.kills_held["stall"] == 1
    assert [h["reason"] for h in wd.status(T0 + 4)["holds"]] == ["stall"]
    wd.tick(T0 + 2 * TIMEOUT + 0.7)  # silent on, the tick on time: killed
    kills = wd.killer.kills  # type: ignore[attr-defined]
    assert [k[0] for k in kills] == [10] and "(stall)" in kills[0][2].detail


def test_hold_lines_are_capped_per_tick(
    make: Any, caplog: pytest.LogCaptureFixture
) -> None:
    wd = make({"web": list(range(100, 150))})
    caplog.set_level(logging.WARNING, "circus.watchdog")
    wd.tick(T0 + TIMEOUT + 0.5)
    lines = messages(caplog)
    assert len([m for m in lines if m.startswith("holding")]) == holds.HOLD_LINES
    assert f"and {50 - holds.HOLD_LINES} more storm hold(s) started" in lines
    assert wd.metrics.kills_held["storm"] == 50


def test_dry_run_reports_and_keeps_watching(make: Any) -> None:
    wd = make({"web": [10, 11, 12, 13]}, dry_run="true")
    now = T0
    for _ in range(int((2 * TIMEOUT + 0.5) / TICK)):
        now += TICK
        beat(wd, now, 11, 12, 13)
        wd.tick(now)
    kills = wd.killer.kills  # type: ignore[attr-defined]
    assert [(k[0], k[3]) for k in kills] == [(10, True), (10, True)]
    assert 10 in wd.table


# -- evidence: starved and traced pids are held, hung ones killed ---------------


def examined(wd: engine.Watchdog, tmp_path: Path) -> Path:
    """Turn the checks on, over a fake /proc tree."""
    proc = fake_proc(tmp_path)
    wd.examiner = Examiner(local=True, proc=str(proc))
    wd.policy.evidence = True
    return proc


def beat_others(wd: engine.Watchdog, start: float, end: float, *pids: int) -> float:
    now = start
    for _ in range(int((end - start) / TICK) + 1):
        now += TICK
        if now > end:
            break
        beat(wd, now, *pids)
        wd.tick(now)
    return now


def test_a_starved_pid_is_held_and_a_hung_one_killed(
    make: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wd = make({"web": [10, 11, 12, 13, 14]})
    proc = examined(wd, tmp_path)
    for pid in (10, 11):
        fake_stat(proc, pid, cpu_ticks=0)
    fake_task(proc, 10, 10, 0, 0, state="R")  # runnable, never on a CPU
    fake_task(proc, 11, 11, 0, 0, state="S")  # asleep: hung
    caplog.set_level(logging.WARNING, "circus.watchdog")
    now = beat_others(wd, T0, T0 + TIMEOUT + 3 * TICK, 12, 13, 14)
    kills = wd.killer.kills  # type: ignore[attr-defined]
    assert [k[0] for k in kills] == [11]
    # Killed within its timeout, one tick and the evidence window.
    why = kills[0][2]
    assert why.silent_for <= TIMEOUT + TICK + MIN_WINDOW + 1e-6
    assert why.detail.startswith("ran 0.00 s and waited 0.00 s for a CPU in the last")
    assert [(h["pid"], h["reason"]) for h in wd.status(now)["holds"]] == [
        (10, "starved")
    ]
    assert "holding web pid 10: starved, ran 0.00 s and waited 0.00 s for a CPU" in (
        caplog.text
    )
    assert "host CPU pressure 64 %" in caplog.text
    assert wd.metrics.kills_held["starved"] == 1
    # It gets a CPU and beats again: the hold ends, logged once.
    beat(wd, now + 0.5, 10)
    now = beat_others(wd, now + 0.5, now + 1.0, 12, 13, 14)
    assert "hold of web pid 10 ended: resumed (starved, held " in caplog.text
    assert wd.status(now)["holds"] == [] and len(kills) == 1


def test_a_traced_pid_is_held_until_the_bound(
    make: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wd = make({"web": [10, 12, 13, 14]})
    proc = examined(wd, tmp_path)
    fake_stat(proc, 10, cpu_ticks=0)
    fake_stat(proc, 999, cpu_ticks=0)
    (proc / "999" / "comm").write_text("gdb\n")
    fake_task(proc, 10, 10, 0, 0, state="t", tracer=999)
    caplog.set_level(logging.WARNING, "circus.watchdog")
    end = T0 + (HOLD_LIMIT + 2) * (TIMEOUT + 2 * TICK)
    beat_others(wd, T0, end, 12, 13, 14)
    assert caplog.text.count("holding web pid 10: traced by pid 999 (gdb)") == 1
    kills = wd.killer.kills  # type: ignore[attr-defined]
    assert [k[0] for k in kills] == [10]
    why = kills[0][2]
    assert why.silent_for >= HOLD_LIMIT * TIMEOUT
    assert "held " in why.detail and "(traced)" in why.detail
    assert wd.metrics.kills_held["traced"] >= HOLD_LIMIT - 1


def test_evidence_reads_are_capped_per_tick(
    make: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not our own pid (after a pid wrap it can be one of these): the watcher
    # running the watchdog is never monitored.
    pids = [pid for pid in range(1000, 1151) if pid != os.getpid()][:150]
    wd = make({"web": pids}, storm_guard="false")
    proc = examined(wd, tmp_path)
    for pid in pids:
        fake_stat(proc, pid, cpu_ticks=0)
        fake_task(proc, pid, pid, 0, 0)  # asleep: hung
    reads: list[int] = []
    real = evidence.read_sched

    def counted(pid: int, at: float, proc: str = "/proc") -> Any:
        reads.append(pid)
        return real(pid, at, proc)

    monkeypatch.setattr(evidence, "read_sched", counted)
    now, per_tick = T0 + TIMEOUT, []
    for _ in range(20):
        now += TICK
        before = len(reads)
        wd.tick(now)
        per_tick.append(len(reads) - before)
    assert max(per_tick) == evidence.READINGS_PER_TICK
    kills = wd.killer.kills  # type: ignore[attr-defined]
    assert sorted(k[0] for k in kills) == pids  # deferred, not dropped
    assert len(reads) == 2 * len(pids)  # two readings each, no more


def test_a_start_that_fails_says_it_did_not_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        wd = engine.Watchdog(config(metrics_port=str(port), port=str(free_udp_port())))
        with caplog.at_level(logging.INFO, "circus.watchdog"):
            with pytest.raises(OSError, match="metrics_port"):
                asyncio.run(wd.run(asyncio.Event()))
    lines = [r.getMessage() for r in caplog.records]
    assert "watchdog did not start" in lines and "watchdog stopped" not in lines


def test_a_stall_in_the_evidence_window_delays_the_kill_by_a_tick(
    make: Any, tmp_path: Path
) -> None:
    wd = make({"web": [10, 12, 13, 14]})
    proc = examined(wd, tmp_path)
    fake_stat(proc, 10, cpu_ticks=0)
    fake_task(proc, 10, 10, 0, 0)  # asleep: hung
    now = beat_others(wd, T0, T0 + TIMEOUT + TICK, 12, 13, 14)
    late = wd.registry.late(10)
    assert late is not None and late.reading is not None  # first reading taken
    now += TICK
    beat(wd, now, 12, 13, 14)
    wd.tick(now, late=True)  # the watchdog froze: no kill, no hold
    assert wd.killer.kills == [] and wd.status(now)["holds"] == []  # type: ignore[attr-defined]
    assert wd.metrics.stalls == 1
    now = beat_others(wd, now, now + 2 * TICK, 12, 13, 14)
    kills = wd.killer.kills  # type: ignore[attr-defined]
    assert [k[0] for k in kills] == [10] and "held" not in kills[0][2].detail


def test_kills_made_on_evidence_count_toward_the_storm_guard(
    make: Any, tmp_path: Path
) -> None:
    # Six pids; two hang a few ticks apart, then two more: the first two die
    # on evidence, and those kills keep the second pair from dying too.
    wd = make({"web": [10, 11, 12, 13, 14, 15]})
    proc = examined(wd, tmp_path)
    for pid in (10, 11, 12, 13):
        fake_stat(proc, pid, cpu_ticks=0)
        fake_task(proc, pid, pid, 0, 0)  # asleep: hung
    now = T0
    for _ in range(int((TIMEOUT + 1.0) / TICK)):
        now += TICK
        beat(wd, now, 14, 15)
        if now < T0 + 0.5:
            beat(wd, now, 12, 13)  # they hang half a second later
        wd.tick(now)
    kills = wd.killer.kills  # type: ignore[attr-defined]
    assert sorted(k[0] for k in kills) == [10, 11]
    assert sorted(h["pid"] for h in wd.status(now)["holds"]) == [12, 13]
    assert {h["reason"] for h in wd.status(now)["holds"]} == {"storm"}
