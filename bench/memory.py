"""Bytes per monitored pid: the compiled core, its pure twin and the original.

Run as ``python bench/memory.py [--pids N]``; ``test_memory_per_pid`` in
bench/test_core_benchmarks.py reports the same figures.

tracemalloc counts every allocation made while the pids are added: the
compiled core's C arrays (it allocates with PyMem_RawMalloc, which tracemalloc
traces), the pure twin's dict and lists, the original's ``pid_status`` dict of
dicts.  Each pid is created inside the measurement and gets its own timestamp
float, as when heartbeats arrive at distinct times, so an implementation pays
for the Python objects it keeps alive.
"""

from __future__ import annotations

import argparse
import gc
import tracemalloc
from typing import NamedTuple

from support import (
    T0,
    TICK,
    TIMEOUT,
    WATCHERS,
    core_module,
    fill_original,
    original_watchdog,
)

IMPLS = ("c", "py", "original")


class Footprint(NamedTuple):
    """What monitoring ``npids`` pids costs, in bytes."""

    impl: str
    npids: int
    total: int  # still allocated once every pid is monitored
    peak: int  # at most allocated on the way (array growth copies)

    @property
    def per_pid(self) -> float:
        return self.total / self.npids

    @property
    def peak_per_pid(self) -> float:
        return self.peak / self.npids


def measure(impl: str, npids: int) -> Footprint:
    """Trace the allocations of monitoring pids 1..npids with ``impl``."""
    gc.collect()
    if impl == "original":
        with original_watchdog() as wd:
            pid_status = wd.pid_status
            tracemalloc.start()
            try:
                base = tracemalloc.get_traced_memory()[0]
                fill_original(pid_status, range(1, npids + 1))
                total, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            del pid_status
            wd.pid_status = {}
    else:
        table_cls = core_module(impl).HeartbeatTable
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            table = table_cls(TIMEOUT, TICK)
            add = table.add
            for pid in range(1, npids + 1):
                add(pid, WATCHERS[pid % len(WATCHERS)], T0 + pid * 1e-6)
            assert len(table) == npids
            total, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        del table, add
    gc.collect()
    return Footprint(impl, npids, total - base, peak - base)


def format_table(rows: list[Footprint]) -> str:
    """A small text table of bytes per pid, with the ratio to the original."""
    ref = {r.impl: r for r in rows}.get("original")
    lines = [
        f"{'impl':<10}{'pids':>10}{'bytes/pid':>12}{'peak/pid':>11}"
        f"{'total MiB':>11}{'vs original':>13}",
    ]
    for r in rows:
        vs = f"{r.per_pid / ref.per_pid:.2f}x" if ref else "-"
        lines.append(
            f"{r.impl:<10}{r.npids:>10,}{r.per_pid:>12.1f}{r.peak_per_pid:>11.1f}"
            f"{r.total / 2**20:>11.1f}{vs:>13}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pids", type=int, default=1_000_000, help="monitored pids (count)"
    )
    parser.add_argument(
        "--impl",
        choices=IMPLS,
        action="append",
        help="implementation to measure (repeatable; default: all)",
    )
    args = parser.parse_args()
    rows = [measure(impl, args.pids) for impl in args.impl or IMPLS]
    print(format_table(rows))


if __name__ == "__main__":
    main()
