"""CpuSampler (sampler.py): baselines on a fake /proc and over both cores."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from circus_watchdog import procfs
from circus_watchdog import sampler as sampler_mod
from circus_watchdog.diagnostics import Snapshot
from circus_watchdog.sampler import Baseline, CpuSampler
from procs import Children, FakeTable, fake_stat


@pytest.fixture
def spawn() -> Iterator[Children]:
    """Child processes, killed and reaped at teardown."""
    with Children() as children:
        yield children


def test_sampler_baseline_follows_heartbeats(tmp_path):  # type: ignore[no-untyped-def]
    tck = procfs.CLK_TCK
    fake_stat(tmp_path, 10, cpu_ticks=1 * tck)
    sampler = CpuSampler(period=1, tick=1, proc=str(tmp_path))
    table = FakeTable({10: 1.0})
    sampler.sample(table, 1.5)
    assert sampler.baseline(10) == Baseline(1.0, 1.0, 7, 1.5)
    fake_stat(tmp_path, 10, cpu_ticks=3 * tck)
    sampler.sample(table, 2.5)  # no heartbeat since: the baseline stays
    assert sampler.baseline(10) == Baseline(1.0, 1.0, 7, 1.5)
    snap = Snapshot.take(10, sampler.baseline(10), 4.0, str(tmp_path))
    assert (snap.cpu_since_beat, snap.cpu_window, snap.threads) == (2.0, 2.5, 3)
    table.last[10] = 3.0  # a heartbeat: a new baseline at the next visit
    sampler.sample(table, 3.5)
    assert sampler.baseline(10) == Baseline(3.0, 3.0, 7, 3.5)
    fake_stat(tmp_path, 10, cpu_ticks=9 * tck, start=8)  # the pid was reused
    assert (
        Snapshot.take(10, sampler.baseline(10), 4.0, str(tmp_path)).cpu_since_beat
        is None
    )


def test_sampler_state_is_bounded_by_the_monitored_pids(tmp_path):  # type: ignore[no-untyped-def]
    for pid in range(100, 140):
        fake_stat(tmp_path, pid, 1)
    sampler = CpuSampler(period=1, tick=1, proc=str(tmp_path))
    table = FakeTable({pid: 1.0 for pid in range(100, 140)})
    sampler.sample(table, 1.0)
    assert len(sampler) == 40
    for pid in range(100, 135):
        del table.last[pid]
    for _ in range(3):
        sampler.sample(table, 2.0)
    assert len(sampler) == 5
    table.last[999] = 1.0  # no /proc entry: remembered as unreadable
    sampler.sample(table, 3.0)
    sampler.sample(table, 3.0)
    assert len(sampler) == 6
    base = sampler.baseline(999)
    assert base is not None and base.start == sampler_mod.UNREADABLE
    fake_stat(tmp_path, 999, 1)  # read again only after a heartbeat
    sampler.sample(table, 4.0)
    assert sampler.baseline(999) == base
    table.last[999] = 2.0
    sampler.sample(table, 5.0)
    assert sampler.baseline(999) == Baseline(2.0, 1 / procfs.CLK_TCK, 7, 5.0)


def test_sampler_visits_a_bounded_slice_per_tick(tmp_path):  # type: ignore[no-untyped-def]
    sampler = CpuSampler(period=30, tick=1)
    assert sampler.visits(10) == 1  # each pid about once per period
    assert sampler.visits(300) == 10
    assert sampler.visits(10_000_000) == sampler_mod.MAX_VISITS
    assert CpuSampler(period=0.5, tick=1).visits(10) == 10  # at most all of them
    table = FakeTable({pid: 1.0 for pid in range(1, 601)})
    seen: list[int] = []
    table.last_seen = lambda pid: seen.append(pid) or 1.0  # type: ignore[method-assign]
    for tick in range(31):
        sampler.sample(table, float(tick))
    # Round robin: every pid once in 30 ticks, then the next round begins.
    assert seen[:600] == list(range(1, 601)) and seen[600:] == list(range(1, 21))


def test_sampler_over_both_cores(table_cls, spawn):  # type: ignore[no-untyped-def]
    pid = spawn.start("sleep", "60")
    table = table_cls(3.0, 0.1)
    table.add(pid, "web", 1.0)
    table.add(4_000_000, "web", 1.0)  # no such process: remembered as unreadable
    sampler = CpuSampler(period=0.1, tick=0.1)
    sampler.sample(table, 1.5)
    base = sampler.baseline(pid)
    assert base is not None and (base.beat, base.at) == (1.0, 1.5) and base.cpu >= 0
    table.remove(4_000_000)
    with pytest.raises(KeyError):  # what the sampler expects of a pid gone mid-round
        table.last_seen(4_000_000)
    sampler.sample(table, 1.6)
    sampler.sample(table, 1.7)
    assert len(sampler) == 1 and sampler.baseline(4_000_000) is None
    table.beat(pid, 2.0)
    sampler.sample(table, 2.1)
    assert sampler.baseline(pid).beat == 2.0  # type: ignore[union-attr]
