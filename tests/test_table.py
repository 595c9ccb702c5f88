"""HeartbeatTable: API, argument checks, and a stateful model test over both cores."""

from __future__ import annotations

import collections
import math
import os
from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import (  # noqa: E402
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)


@pytest.mark.parametrize(
    ("timeout", "tick", "named"),
    [
        (0, 0.1, "timeout"),
        (-1, 0.1, "timeout"),
        (math.inf, 0.1, "timeout"),
        (math.nan, 0.1, "timeout"),
        ("x", 0.1, "timeout"),
        (3, 0, "tick"),
        (3, -0.1, "tick"),
        (3, 4, "tick"),
        (3, None, "tick"),
    ],
)
def test_bad_arguments_name_the_argument(
    table_cls: type, timeout: Any, tick: Any, named: str
) -> None:
    with pytest.raises(ValueError, match=named):
        table_cls(timeout, tick)


def test_add_beat_expire(table_cls: type) -> None:
    t = table_cls(3.0, 0.1)
    t.add(100, "web", 10.0)
    t.add(200, "api", 10.0)
    assert len(t) == 2 and 100 in t and 300 not in t
    assert t.watcher_of(200) == "api"
    assert t.last_seen(100) == 10.0
    assert t.beat(100, 12.0) is True
    assert t.beat(300, 12.0) is False  # unknown pids create nothing
    assert 300 not in t and len(t) == 2
    assert t.expire(13.0) == []  # nobody silent for more than 3 s yet
    assert t.expire(13.05) == [(200, "api")]  # 3.05 s of silence
    assert 200 not in t
    assert t.expire(15.0) == []
    assert t.expire(15.1) == [(100, "web")]
    assert len(t) == 0


def test_exact_boundary_is_not_expired(table_cls: type) -> None:
    t = table_cls(1.0, 0.25)
    t.add(1, "w", 0.0)
    assert t.expire(1.0) == []  # silent for exactly the timeout: not yet
    assert t.expire(math.nextafter(1.0, 2.0)) == [(1, "w")]


def test_readd_restarts_and_moves_watcher(table_cls: type) -> None:
    t = table_cls(2.0, 0.5)
    t.add(5, "a", 0.0)
    t.add(5, "b", 1.5)
    assert len(t) == 1 and t.watcher_of(5) == "b"
    assert t.expire(3.0) == []
    assert t.expire(3.6) == [(5, "b")]


def test_remove(table_cls: type) -> None:
    t = table_cls(1.0, 0.1)
    t.add(5, "a", 0.0)
    assert t.remove(5) is True
    assert t.remove(5) is False
    assert t.remove(-1) is False
    assert t.expire(10.0) == []


def test_beat_never_moves_backwards(table_cls: type) -> None:
    t = table_cls(1.0, 0.1)
    t.add(5, "a", 10.0)
    t.beat(5, 9.0)
    assert t.last_seen(5) == 10.0


def test_unknown_lookups(table_cls: type) -> None:
    t = table_cls(1.0, 0.1)
    for bad in (1, 0, -5, 2**40, "1"):
        assert bad not in t
        with pytest.raises(KeyError):
            t.watcher_of(bad)
        with pytest.raises(KeyError):
            t.last_seen(bad)
        assert t.beat(bad, 1.0) is False


@pytest.mark.parametrize("pid", [0, -1, 2**31])
def test_add_rejects_impossible_pids(table_cls: type, pid: int) -> None:
    with pytest.raises(ValueError, match="pid"):
        table_cls(1.0, 0.1).add(pid, "w", 0.0)


def test_many_pids_and_slot_reuse(table_cls: type) -> None:
    t = table_cls(1.0, 0.1)
    for round_ in range(3):
        base = round_ * 1000
        for pid in range(base + 1, base + 5001):
            t.add(pid, "w", float(round_ * 10))
        assert len(t) == 5000
        assert sorted(t.pids()) == list(range(base + 1, base + 5001))
        expired = t.expire(round_ * 10 + 1.5)
        assert sorted(p for p, _ in expired) == list(range(base + 1, base + 5001))
        assert len(t) == 0


def test_tick_cost_does_not_depend_on_table_size(table_cls: type) -> None:
    # A tick walks only the buckets that came due: with nothing filed in them
    # no slot is touched, which shows as no slot being re-filed (the order of
    # a bucket's list would change if it were walked).
    t = table_cls(10.0, 1.0)
    for pid in range(1, 1001):
        t.add(pid, "w", 0.0)
    assert t.expire(5.0) == []
    assert len(t) == 1000
    assert len(t.expire(10.5)) == 1000


class Model:
    """The obvious implementation: a dict and a full sweep."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.wlimit: dict[str, float] = {}
        self.last: dict[int, tuple[float, str, float]] = {}  # last, watcher, limit

    def set_watcher_timeout(self, watcher: str, timeout: float) -> None:
        self.wlimit[watcher] = timeout

    def add(self, pid: int, watcher: str, now: float, grace: float | None) -> None:
        limit = self.wlimit.get(watcher, self.timeout) if grace is None else grace
        self.last[pid] = (now, watcher, limit)

    def remove(self, pid: int) -> bool:
        return self.last.pop(pid, None) is not None

    def beat(self, pid: int, now: float) -> bool:
        if pid not in self.last:
            return False
        seen, watcher, _ = self.last[pid]
        limit = self.wlimit.get(watcher, self.timeout)
        self.last[pid] = (max(seen, now), watcher, limit)
        return True

    def expire(self, now: float) -> list[tuple[int, str]]:
        out = [(p, w) for p, (s, w, lim) in self.last.items() if s + lim < now]
        for pid, _ in out:
            del self.last[pid]
        return out


# More with CIRCUS_WATCHDOG_STATEFUL_EXAMPLES=2000 for a longer search.
STATEFUL_EXAMPLES = int(os.environ.get("CIRCUS_WATCHDOG_STATEFUL_EXAMPLES", "150"))
PIDS = st.integers(1, 40)
WATCHERS = st.sampled_from(["web", "api", "worker.1"])


def make_machine(classes: list[type]) -> type[RuleBasedStateMachine]:
    """A state machine driving the model and each table class in lockstep."""

    class TableMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.tables: list[Any] = []
            self.model: Model | None = None
            self.now = 0.0

        @initialize(
            timeout=st.sampled_from([0.5, 1.0, 3.0, 7.5]),
            ticks=st.sampled_from([1, 2, 3, 10, 30]),
            start=st.floats(0, 1e6),
        )
        def setup(self, timeout: float, ticks: int, start: float) -> None:
            self.model = Model(timeout)
            self.tables = [cls(timeout, timeout / ticks) for cls in classes]
            self.now = start

        @rule(dt=st.one_of(st.floats(0, 0.2), st.floats(0, 2.0), st.floats(0, 50.0)))
        def advance(self, dt: float) -> None:
            self.now += dt

        @rule(pid=PIDS, watcher=WATCHERS, grace=st.sampled_from([None, 0.3, 2, 40]))
        def add(self, pid: int, watcher: str, grace: float | None) -> None:
            assert self.model is not None
            self.model.add(pid, watcher, self.now, grace)
            for t in self.tables:
                t.add(pid, watcher, self.now, grace)

        @precondition(lambda self: self.model is not None)
        @rule(watcher=WATCHERS, timeout=st.sampled_from([0.4, 1.0, 5.0, 30.0]))
        def set_watcher_timeout(self, watcher: str, timeout: float) -> None:
            assert self.model is not None
            self.model.set_watcher_timeout(watcher, timeout)
            for t in self.tables:
                t.set_watcher_timeout(watcher, timeout)
                assert t.watcher_timeout(watcher) == timeout

        @rule(pid=PIDS)
        def remove(self, pid: int) -> None:
            assert self.model is not None
            expected = self.model.remove(pid)
            assert [t.remove(pid) for t in self.tables] == [expected] * len(self.tables)

        @rule(pid=PIDS)
        def beat(self, pid: int) -> None:
            assert self.model is not None
            expected = self.model.beat(pid, self.now)
            assert [t.beat(pid, self.now) for t in self.tables] == [expected] * len(
                self.tables
            )

        @precondition(lambda self: self.model is not None)
        @rule()
        def expire(self) -> None:
            assert self.model is not None
            expected = sorted(self.model.expire(self.now))
            results = [t.expire(self.now) for t in self.tables]
            for got in results:
                assert sorted(got) == expected
            # The twins run one algorithm: same entries in the same order.
            assert all(r == results[0] for r in results)

        @invariant()
        def same_contents(self) -> None:
            if self.model is None:
                return
            for t in self.tables:
                assert len(t) == len(self.model.last)
                assert sorted(t.pids()) == sorted(self.model.last)
                for pid, (seen, watcher, _) in self.model.last.items():
                    assert t.last_seen(pid) == seen
                    assert t.watcher_of(pid) == watcher
                counts = collections.Counter(w for _, w, _ in self.model.last.values())
                assert t.watcher_counts() == dict(counts)

    return TableMachine


def test_stateful_against_model(table_cls: type) -> None:
    run_state_machine_as_test(
        make_machine([table_cls]),
        settings=settings(
            max_examples=STATEFUL_EXAMPLES, stateful_step_count=60, deadline=None
        ),
    )


@pytest.mark.c_extension
def test_stateful_twins_agree() -> None:
    from circus_watchdog import _core_c, _core_py

    run_state_machine_as_test(
        make_machine([_core_c.HeartbeatTable, _core_py.HeartbeatTable]),
        settings=settings(
            max_examples=STATEFUL_EXAMPLES, stateful_step_count=60, deadline=None
        ),
    )


def test_grace_until_the_first_beat(table_cls: type) -> None:
    t = table_cls(2.0, 0.5)
    t.add(1, "slow", 0.0, grace=10.0)
    t.add(2, "slow", 0.0)
    assert t.expire(5.0) == [(2, "slow")]  # no grace: timeout 2 s
    assert t.expire(9.0) == []  # still in its 10 s grace
    t.beat(1, 9.5)  # the first beat ends the grace: timeout again
    assert t.expire(11.0) == []
    assert t.expire(11.6) == [(1, "slow")]


def test_watcher_timeouts(table_cls: type) -> None:
    t = table_cls(2.0, 0.5)
    t.set_watcher_timeout("batch", 30.0)
    assert t.watcher_timeout("batch") == 30.0 and t.watcher_timeout("web") == 2.0
    t.add(1, "batch", 0.0)
    t.add(2, "web", 0.0)
    assert t.expire(3.0) == [(2, "web")]
    assert t.expire(29.0) == []
    assert t.expire(30.5) == [(1, "batch")]
    with pytest.raises(ValueError, match="timeout"):
        t.set_watcher_timeout("web", 0)
    with pytest.raises(ValueError, match="grace"):
        t.add(3, "web", 0.0, grace=-1)


def test_watcher_counts(table_cls: Any) -> None:
    table = table_cls(3.0, 0.1)
    assert table.watcher_counts() == {}
    for pid in (10, 11, 12):
        table.add(pid, "web", 0.0)
    table.add(20, "idle", 0.0)
    table.add(30, "gone", 0.0)
    table.remove(30)
    assert table.watcher_counts() == {"web": 3, "idle": 1}
    table.remove(10)
    table.add(11, "idle", 0.0)  # re-added under another watcher
    assert table.watcher_counts() == {"web": 1, "idle": 2}
