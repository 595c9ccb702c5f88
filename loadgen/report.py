"""loadgen's report: the progress line while it runs, then the summary as a
JSON-ready dict and as text."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, TextIO

from .flood import Result

REPORT_EVERY = 0.1  # seconds between progress bar updates (at most 10/s)


class Progress:
    """A carriage-return progress line on a terminal, at most 10 updates/s."""

    def __init__(
        self,
        out: TextIO,
        enabled: bool,
        count: int | None,
        duration: float,
    ) -> None:
        self._out = out
        self._enabled = enabled
        self._count = count
        self._duration = duration
        self._start = time.monotonic()
        self._last = 0.0
        self._width = 0

    def restart(self) -> None:
        """Count elapsed time from now (when the workers are told to go)."""
        self._start = time.monotonic()

    def update(self, sent: int) -> None:
        """Redraw the line if the last redraw is REPORT_EVERY seconds old."""
        if not self._enabled:
            return
        now = time.monotonic()
        if now - self._last < REPORT_EVERY:
            return
        self._last = now
        elapsed = now - self._start
        done = elapsed / self._duration
        if self._count:
            done = max(done, sent / self._count)
        done = min(max(done, 0.0), 1.0)
        bar = "#" * int(done * 30)
        rate = sent / elapsed if elapsed > 0 else 0.0
        line = (
            f"[{bar:<30}] {done:4.0%}  {sent:,} sent  {rate:,.0f}/s  "
            f"{elapsed:.1f}/{self._duration:g} s"
        )
        self._width = max(self._width, len(line))
        self._out.write("\r" + line.ljust(self._width))
        self._out.flush()

    def close(self) -> None:
        """Erase the line."""
        if self._enabled and self._width:
            self._out.write("\r" + " " * self._width + "\r")
            self._out.flush()


def summary(
    results: Sequence[Result],
    target: str,
    rate: float | None,
    count: int | None,
    duration: float,
    mix: tuple[float, float],
) -> dict[str, Any]:
    """The run as one JSON-ready dict."""
    ran = [r for r in results if r.error is None and r.end > 0]
    elapsed = max(r.end for r in ran) - min(r.start for r in ran) if ran else 0.0
    sent = sum(r.sent for r in results)
    return {
        "target": target,
        "sent": sent,
        "elapsed": round(elapsed, 6),
        "rate": round(sent / elapsed, 1) if elapsed > 0 else 0.0,
        "errors": sum(r.errors for r in results),
        "full": sum(r.full for r in results),
        "valid": sum(r.valid for r in results),
        "malformed": sum(r.malformed for r in results),
        "unknown": sum(r.unknown for r in results),
        "interrupted": any(r.interrupted for r in results),
        "mix": {"malformed": mix[0], "unknown": mix[1]},
        "requested": {
            "rate": "max" if rate is None else rate,
            "count": count,
            "duration": duration,
        },
        "workers": [r.to_dict() for r in results],
    }


def render(report: dict[str, Any]) -> str:
    """The human report: one line per worker, then the total."""
    req = report["requested"]
    rate = req["rate"] if req["rate"] == "max" else f"{req['rate']:g}/s"
    mix = report["mix"]
    lines = [
        f"loadgen -> {report['target']}: rate {rate}, count {req['count'] or '-'}, "
        f"duration {req['duration']:g} s, mix malformed={mix['malformed']:g} "
        f"unknown={mix['unknown']:g}",
        f"{'worker':>7} {'sent':>12} {'elapsed':>9} {'rate/s':>12} "
        f"{'errors':>7} {'full':>7}",
    ]
    for w in report["workers"]:
        lines.append(
            f"{w['worker']:>7} {w['sent']:>12,} {w['elapsed']:>8.3f}s "
            f"{w['rate']:>12,.0f} {w['errors']:>7,} {w['full']:>7,}"
            + (f"  ({w['error']})" if w["error"] else "")
        )
    lines.append(
        f"{'total':>7} {report['sent']:>12,} {report['elapsed']:>8.3f}s "
        f"{report['rate']:>12,.0f} {report['errors']:>7,} {report['full']:>7,}"
    )
    if report["malformed"] or report["unknown"]:
        lines.append(
            f"kinds: valid {report['valid']:,}, malformed {report['malformed']:,}, "
            f"unknown {report['unknown']:,}"
        )
    for w in report["workers"]:
        if w["last_error"]:
            hint = ""
            if w["last_error"].startswith("ConnectionRefusedError"):
                hint = " (is anything listening on the target?)"
            lines.append(
                f"worker {w['worker']} last send error: {w['last_error']}{hint}"
            )
    if report["interrupted"]:
        lines.append("interrupted")
    return "\n".join(lines)
