"""Medians, paired ratios, the markdown tables, the targets and the plot.

Ratios are paired: within one repetition of one rate, the receivers ran back to
back, so each ratio is taken inside a repetition, then its median and min-max
over the repetitions are reported.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

KINDS = ("daemon", "original", "floor_block", "floor_sleep")
LABELS = {
    "daemon": "circus-watchdog daemon (whole process)",
    "daemon_per_wakeup": "daemon, --batch-delay 0 (read on every wake-up)",
    "original": "circus 0.19 WatchDog receive path",
    "floor_block": "C floor: blocking recvmmsg(MSG_WAITFORONE)",
    "floor_sleep": "C floor: recvmmsg(MSG_DONTWAIT) until empty, sleep 1 ms",
}
COLORS = {
    "daemon": "#2ca02c",
    "original": "#d62728",
    "floor_block": "#7f7f7f",
    "floor_sleep": "#1f77b4",
}
RATIOS = (
    ("daemon", "floor_sleep", "daemon / floor_sleep"),
    ("daemon", "floor_block", "daemon / floor_block"),
    ("original", "daemon", "original / daemon"),
)


def spread(values: Iterable[float | None]) -> dict[str, float] | None:
    """Median, min and max of the values that are not None."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "n": len(vals),
    }


def _fmt(s: dict[str, float] | None, spec: str = ".3g", scale: float = 1.0) -> str:
    if s is None:
        return "-"
    med, lo, hi = (format(s[k] * scale, spec) for k in ("median", "min", "max"))
    return med if s["n"] == 1 else f"{med} [{lo}-{hi}]"


def rate_label(rate: str) -> str:
    return rate if rate == "max" else f"{float(rate) / 1000:g}k"


def grouped(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, list[Any]]]:
    """{offered: {receiver: [rows, by repetition]}}, in the order met."""
    out: dict[str, dict[str, list[Any]]] = {}
    for row in rows:
        out.setdefault(row["offered"], {}).setdefault(row["receiver"], []).append(row)
    return out


def paired(
    rows: Sequence[dict[str, Any]], num: str, den: str, key: str = "cpu_us_per_hb"
) -> dict[str, dict[str, float] | None]:
    """{offered: spread of row[num][key] / row[den][key], paired by repetition}."""
    cells: dict[tuple[str, int], dict[str, Any]] = {}
    for row in rows:
        cells.setdefault((row["offered"], row["repeat"]), {})[row["receiver"]] = row
    ratios: dict[str, list[float]] = {}
    for (rate, _), cell in cells.items():
        a, b = cell.get(num, {}).get(key), cell.get(den, {}).get(key)
        if a and b:
            ratios.setdefault(rate, []).append(a / b)
    return {rate: spread(vals) for rate, vals in ratios.items()}


def summary(res: dict[str, Any]) -> dict[str, Any]:
    """Everything the tables, the targets and the plot need."""
    rows = res.get("rates", [])
    out: dict[str, Any] = {"cpu": {}, "ratios": {}, "loss": {}}
    for rate, kinds in grouped(rows).items():
        out["cpu"][rate] = {
            k: spread(r["cpu_us_per_hb"] for r in rs) for k, rs in kinds.items()
        }
        out["loss"][rate] = {
            k: {
                "sent": sum(r["sent"] for r in rs),
                "sent_rate": spread(r["sent_rate"] for r in rs),
                "processed": spread(r["processed_rate"] for r in rs),
                "loss": sum(r["loss"] for r in rs),
                "drops": sum(r["socket_drops"] for r in rs),
                "rcvbuf_errors": sum(r["rcvbuf_errors"] for r in rs),
            }
            for k, rs in kinds.items()
        }
    for num, den, name in RATIOS:
        out["ratios"][name] = paired(rows, num, den)
    low = res.get("low_rate", [])
    if low:
        out["low_rate"] = {
            k: spread(r["cpu_us_per_hb"] for r in rs)
            for k, rs in next(iter(grouped(low).values())).items()
        }
        [(_, ratio)] = paired(low, "daemon", "daemon_per_wakeup").items() or [(0, None)]
        out["low_rate_ratio"] = ratio
    fresh = res.get("freshness")
    if fresh:
        out["freshness"] = {k: spread(fresh[k]["delays"]) for k in ("idle", "flood")}
    bl = res.get("backlog", [])
    if bl:
        kinds: dict[str, list[dict[str, Any]]] = {}
        for row in bl:
            kinds.setdefault(row["receiver"], []).append(row)
        out["backlog"] = {
            k: {
                "capacity": spread(r["capacity"] for r in rs),
                "cpu": spread(r["cpu_us_per_hb"] for r in rs),
                "queued": rs[0]["queued"],
            }
            for k, rs in kinds.items()
        }
        for row in bl:
            row.setdefault("offered", "backlog")
        out["backlog_ratio"] = paired(bl, "daemon", "original", "capacity").get(
            "backlog"
        )
    return out


def targets(
    res: dict[str, Any], s: dict[str, Any]
) -> list[tuple[str, bool | None, str]]:
    """(target, met?, measured) for each end-to-end performance target."""
    out: list[tuple[str, bool | None, str]] = []
    for rate in ("200000", "100000", "50000"):
        sleep = s["ratios"]["daemon / floor_sleep"].get(rate)
        orig = s["ratios"]["original / daemon"].get(rate)
        label = rate_label(rate)
        if sleep:
            out.append(
                (
                    f"daemon CPU/heartbeat <= 1.25x floor_sleep at {label}/s "
                    "(aim 1.1x; median of paired ratios)",
                    sleep["median"] <= 1.25,
                    f"{_fmt(sleep)}x",
                )
            )
        if orig:
            out.append(
                (
                    f"daemon CPU/heartbeat >= 8x less than the original at {label}/s",
                    orig["median"] >= 8,
                    f"{_fmt(orig)}x less",
                )
            )
    zl = res.get("zero_loss")
    if zl:
        out.append(
            (
                f"zero loss and zero kernel drops over {zl['window']:g} s at 200k/s, "
                "daemon at its default rcvbuf",
                zl["loss"] == 0 and zl["socket_drops"] == 0,
                f"sent {zl['sent']:,} ({zl['sent_rate']:,.0f}/s), counted "
                f"{zl['datagrams']:,}, socket drops {zl['socket_drops']:,} "
                f"(host RcvbufErrors +{zl['rcvbuf_errors']:,})",
            )
        )
    for label, f in s.get("freshness", {}).items():
        if f:
            out.append(
                (
                    f"freshness < 5 ms ({label}; worst of the probes)",
                    f["max"] < 0.005,
                    f"{_fmt(f, '.2f', 1e3)} ms",
                )
            )
    low = s.get("low_rate_ratio")
    if low:
        out.append(
            (
                "1k/s: default path not above the per-wake-up path (CPU/heartbeat)",
                low["median"] <= 1.0,
                f"default / per-wake-up = {_fmt(low)}",
            )
        )
    return out


def markdown(res: dict[str, Any]) -> str:
    """The tables of docs/benchmarks.md, from a results file."""
    s = summary(res)
    args = res.get("args", {})
    lines: list[str] = []
    if s["cpu"]:
        kinds = [k for k in KINDS if any(k in c for c in s["cpu"].values())]
        lines += [
            f"CPU per heartbeat, microseconds (user + system of the receiver "
            f"process, all threads, over {args.get('window', 0):g} s windows; "
            f"median [min-max] of {args.get('repeats')} repetitions):",
            "",
            "| offered | " + " | ".join(kinds) + " |",
            "|---|" + "--:|" * len(kinds),
        ]
        for rate, cells in s["cpu"].items():
            lines.append(
                f"| {rate_label(rate)}/s | "
                + " | ".join(_fmt(cells.get(k)) for k in kinds)
                + " |"
            )
        lines += [
            "",
            "Ratios of CPU per heartbeat, paired within each repetition "
            "(median [min-max]):",
            "",
            "| offered | " + " | ".join(name for *_, name in RATIOS) + " |",
            "|---|" + "--:|" * len(RATIOS),
        ]
        for rate in s["cpu"]:
            lines.append(
                f"| {rate_label(rate)}/s | "
                + " | ".join(
                    _fmt(s["ratios"][name].get(rate), ".2f") + "x"
                    for *_, name in RATIOS
                )
                + " |"
            )
        lines += [
            "",
            "Loss (sent - counted) and kernel drops (the socket's drop count), "
            "summed over the repetitions; sent and processed heartbeats/s, "
            "median [min-max]:",
            "",
            "| offered | receiver | sent/s | processed/s | sent | loss | drops |",
            "|---|---|--:|--:|--:|--:|--:|",
        ]
        for rate, cells in s["loss"].items():
            for k in kinds:
                c = cells.get(k)
                if c is None:
                    continue
                pct = 100 * c["loss"] / c["sent"] if c["sent"] else 0.0
                lines.append(
                    f"| {rate_label(rate)}/s | {k} | {_fmt(c['sent_rate'], ',.0f')} | "
                    f"{_fmt(c['processed'], ',.0f')} | {c['sent']:,} | "
                    f"{c['loss']:,} ({pct:.1f}%) | {c['drops']:,} |"
                )
        lines.append("")
    lines += _other_tables(res, s)
    tg = targets(res, s)
    if tg:
        lines += ["Targets:", ""]
        for name, ok, detail in tg:
            state = "n/a" if ok is None else ("met" if ok else "**missed**")
            lines.append(f"- {state}: {name}: {detail}")
        lines.append("")
    return "\n".join(lines)


def _other_tables(res: dict[str, Any], s: dict[str, Any]) -> list[str]:
    args = res.get("args", {})
    lines: list[str] = []
    if s.get("low_rate"):
        lines += [
            f"{rate_label(args.get('low_rate', '1000'))}/s for "
            f"{args.get('low_window', 0):g} s, the daemon's default receive path "
            "and `--batch-delay 0` (read on every wake-up), same run, CPU per "
            "heartbeat in microseconds (median [min-max]):",
            "",
            "| receiver | CPU us/hb |",
            "|---|--:|",
        ]
        for k, v in s["low_rate"].items():
            lines.append(f"| {k} | {_fmt(v)} |")
        lines += ["", f"default / per-wake-up: {_fmt(s['low_rate_ratio'], '.2f')}", ""]
    zl = res.get("zero_loss")
    if zl:
        lines += [
            f"Zero-loss run: the daemon at 200k/s for {zl['window']:g} s at its "
            f"default rcvbuf: sent {zl['sent']:,} ({zl['sent_rate']:,.0f}/s), "
            f"counted {zl['datagrams']:,}, loss {zl['loss']:,}, socket drops "
            f"{zl['socket_drops']:,}, CPU {zl['cpu_us_per_hb']} us/hb.",
            "",
        ]
    fresh = s.get("freshness")
    if fresh:
        f = res["freshness"]
        lines += [
            f"Freshness: one heartbeat of an unflooded monitored pid, "
            f"{f['tries']} probes each; delay from send to `last_seen` moving "
            f"(/status `monotonic - age`), milliseconds (median [min-max]):",
            "",
            "| daemon | delay ms |",
            "|---|--:|",
            f"| idle | {_fmt(fresh['idle'], '.2f', 1e3)} |",
            f"| under {rate_label(f['flood_rate'])}/s | "
            f"{_fmt(fresh['flood'], '.2f', 1e3)} |",
            "",
        ]
    bl = s.get("backlog")
    if bl:
        queued = next(iter(bl.values()))["queued"]
        lines += [
            f"Backlog: {queued:,} heartbeats queued while the receiver is "
            f"stopped (SIGSTOP), then drained alone (SIGCONT until its queue is "
            f"empty); rcvbuf {args.get('backlog_rcvbuf', 0):,} bytes; median "
            "[min-max]:",
            "",
            "| receiver | heartbeats/s | CPU us/hb |",
            "|---|--:|--:|",
        ]
        for k in KINDS:
            if k in bl:
                lines.append(
                    f"| {k} | {_fmt(bl[k]['capacity'], ',.0f')} | "
                    f"{_fmt(bl[k]['cpu'])} |"
                )
        lines += [
            "",
            f"daemon / original capacity: {_fmt(s.get('backlog_ratio'), '.2f')}x",
            "",
        ]
    return lines


def plot(res: dict[str, Any], path: Path) -> None:
    """CPU per heartbeat by rate (bars with min-max) and the paired ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summary(res)
    rates = list(s["cpu"])
    if not rates:
        return
    fig, (left, mid, right) = plt.subplots(
        1, 3, figsize=(16, 5.5), gridspec_kw={"width_ratios": [1.5, 1, 1]}
    )
    kinds = [k for k in KINDS if any(k in c for c in s["cpu"].values())]
    width = 0.8 / len(kinds)
    for j, kind in enumerate(kinds):
        xs, ys, lo, hi = [], [], [], []
        for i, rate in enumerate(rates):
            c = s["cpu"][rate].get(kind)
            if c:
                xs.append(i + (j - (len(kinds) - 1) / 2) * width)
                ys.append(c["median"])
                lo.append(c["median"] - c["min"])
                hi.append(c["max"] - c["median"])
        bars = left.bar(
            xs,
            ys,
            width,
            yerr=[lo, hi],
            capsize=2,
            color=COLORS[kind],
            label=LABELS[kind],
        )
        left.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    left.set_xticks(range(len(rates)), [f"{rate_label(r)}/s" for r in rates])
    left.set_ylabel("CPU per heartbeat, us (user + sys, whole process)")
    left.set_title("CPU per heartbeat (median, min-max)", fontsize=10)
    handles, names = left.get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8)
    left.grid(axis="y", alpha=0.3)
    x = range(len(rates))
    for (_, _, name), ax, color in (
        (RATIOS[0], mid, COLORS["floor_sleep"]),
        (RATIOS[1], mid, COLORS["floor_block"]),
        (RATIOS[2], right, COLORS["original"]),
    ):
        cells = [s["ratios"][name].get(r) for r in rates]
        pts = [(i, c) for i, c in zip(x, cells, strict=True) if c]
        if not pts:
            continue
        ax.errorbar(
            [i for i, _ in pts],
            [c["median"] for _, c in pts],
            yerr=[
                [c["median"] - c["min"] for _, c in pts],
                [c["max"] - c["median"] for _, c in pts],
            ],
            fmt="o-",
            capsize=3,
            color=color,
            label=name,
        )
    mid.axhline(1.25, ls="--", color="black", lw=0.8, label="target 1.25x")
    mid.axhline(1.0, ls=":", color="black", lw=0.8)
    mid.set_title("daemon vs the C floors (paired ratios)", fontsize=10)
    right.axhline(8, ls="--", color="black", lw=0.8, label="target 8x")
    right.set_title("original vs daemon (paired ratios)", fontsize=10)
    for ax in (mid, right):
        ax.set_xticks(list(x), [f"{rate_label(r)}/s" for r in rates])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    m = res.get("machine", {})
    fig.suptitle(
        f"circus-watchdog end to end ({res.get('date', '')[:10]}): {m.get('cpus')} "
        f"CPUs ({m.get('cpu', '')}), Linux {m.get('kernel', '')}, Python "
        f"{m.get('python', '')}; {res.get('args', {}).get('procs')} real pids "
        "under circusd",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
