"""The end-of-session summary: per-operation figures, ratios and the targets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from support import SIZES

IMPLS = ("c", "py", "original")
RECEIVERS = ("count", "c", "py", "original")


@dataclass
class Results:
    """Figures recorded by the benchmarks, keyed by (group, implementation)."""

    rows: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    def add(self, group: str, impl: str, **values: Any) -> None:
        self.rows.setdefault((group, impl), {}).update(values)

    def get(self, group: str, impl: str, key: str = "op") -> Any:
        return self.rows.get((group, impl), {}).get(key)


def record(
    results: Results, group: str, impl: str, benchmark: Any, ops: int, **extra: Any
) -> float | None:
    """Keep the mean and median seconds of one operation; return the mean.

    ``ops`` is how many operations one timed round does.  Both are None when
    benchmarks are disabled (``--benchmark-disable``).
    """
    mean = median = None
    if benchmark.stats is not None:
        mean = float(benchmark.stats.stats.mean) / ops
        median = float(benchmark.stats.stats.median) / ops
    results.add(group, impl, op=mean, median=median, **extra)
    return mean


def _num(value: float | None, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value * scale:,.3g}"


def _ratio(num: float | None, den: float | None) -> str:
    return "-" if not num or not den else f"{num / den:.3g}x"


def _medians(res: Results, g1: str, i1: str, g2: str, i2: str) -> str:
    return (
        f"median ratio {_ratio(res.get(g1, i1, 'median'), res.get(g2, i2, 'median'))}"
    )


def _table(title: str, head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(
        f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths)
    )
    return [title, "  " + fmt.format(*head), *("  " + fmt.format(*r) for r in rows)]


def format_summary(res: Results) -> list[str]:
    """Text lines for whatever ran; targets are checked on the compiled core.

    Figures are means (as pytest-benchmark's table); each target also shows
    the ratio of medians, which a noisy host disturbs less.
    """
    get = res.get
    out: list[str] = []
    targets: list[tuple[str, bool | None, str]] = []

    def has(group: str, impls: tuple[str, ...] = IMPLS, key: str = "op") -> bool:
        return any(get(group, i, key) is not None for i in impls)

    for group, what in (("parse", "ns per heartbeat"), ("beat", "ns per beat")):
        if not has(group):
            continue
        c, py, orig = (get(group, i) for i in IMPLS)
        out += _table(
            f"{group} ({what}):",
            ["", *IMPLS, "original/c", "original/py"],
            [
                [
                    "",
                    *(_num(v, 1e9) for v in (c, py, orig)),
                    _ratio(orig, c),
                    _ratio(orig, py),
                ]
            ],
        )
        if group == "parse":
            ok = None if not c or not orig else orig / c >= 20
            med = _medians(res, group, "original", group, "c")
            detail = f"original/c = {_ratio(orig, c)}, {med}"
            targets.append(("parse >= 20x the original", ok, detail))

    for kind, title in (("steady", "steady state"), ("nothing-filed", "nothing filed")):
        groups = {size: f"tick-{kind}-{size}" for size in SIZES}
        if not any(has(g) for g in groups.values()):
            continue
        rows = []
        for size, g in groups.items():
            c, py, orig = (get(g, i) for i in IMPLS)
            rows.append(
                [
                    size,
                    *(_num(v, 1e6) for v in (c, py, orig)),
                    _ratio(py, c),
                    _ratio(orig, c),
                ]
            )
        out += _table(
            f"tick, {title} (us per tick; original = one look_after sweep):",
            ["pids", *IMPLS, "py/c", "original/c"],
            rows,
        )
        c1k, c1m = get(groups["1k"], "c"), get(groups["1M"], "c")
        if kind == "steady":
            ok = None if c1m is None else c1m < 1e-3
            med = get(groups["1M"], "c", "median")
            detail = f"mean {_num(c1m, 1e3)} ms, median {_num(med, 1e3)} ms"
            targets.append(("steady tick at 1M pids < 1 ms (c)", ok, detail))
        else:
            # Flat: under 2x from 1k to 1M pids, where a sweep grows 1000x.
            ok = None if not c1k or not c1m else c1m / c1k < 2
            detail = (
                f"1M/1k = {_ratio(c1m, c1k)}, "
                f"{_medians(res, groups['1M'], 'c', groups['1k'], 'c')}"
            )
            targets.append(("no-filed tick flat 1k..1M (c)", ok, detail))

    if has("memory", key="bytes_per_pid"):
        npids = next(
            get("memory", i, "npids") for i in IMPLS if get("memory", i, "npids")
        )
        vals = [get("memory", i, "bytes_per_pid") for i in IMPLS]
        out += _table(
            f"memory (bytes per monitored pid, {npids:,} pids, tracemalloc):",
            ["", *IMPLS, "c/original"],
            [["", *(_num(v) for v in vals), _ratio(vals[0], vals[2])]],
        )
        ok = None if vals[0] is None else vals[0] < 100
        targets.append(("< 100 bytes per pid (c)", ok, f"{_num(vals[0])} bytes"))

    if has("drain", RECEIVERS):
        backlog = next(
            get("drain", i, "backlog") for i in RECEIVERS if get("drain", i, "backlog")
        )
        vals = [get("drain", i) for i in RECEIVERS]
        out += _table(
            f"drain (us of CPU per datagram, {backlog:,} queued per round):",
            ["", *RECEIVERS],
            [
                ["cpu", *(_num(v, 1e6) for v in vals)],
                ["/ count", *(_ratio(v, vals[0]) for v in vals)],
            ],
        )
        ok = None if not vals[0] or not vals[1] else vals[1] / vals[0] <= 1.25
        detail = (
            f"c/count = {_ratio(vals[1], vals[0])}, "
            f"{_medians(res, 'drain', 'c', 'drain', 'count')}"
        )
        targets.append(
            ("drain CPU <= 1.25x the count-only recvmmsg drain (c)", ok, detail)
        )

    if targets:
        out.append("targets:")
        for name, ok, detail in targets:
            state = "n/a" if ok is None else ("met" if ok else "MISSED")
            out.append(f"  {state:<6} {name}: {detail}")
    return out
