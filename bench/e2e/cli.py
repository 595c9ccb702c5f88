"""``python -m bench.e2e``: options, the run, the results file, the report."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import matrix, report
from .fleet import Daemon, fleet
from .floors import build
from .receivers import DaemonReceiver, FloorReceiver, OriginalReceiver, Receiver
from .sender import ROOT, Sender, pinned

RESULTS = ROOT / "bench" / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.e2e",
        description="The whole daemon, circus 0.19's WatchDog and two C floors, "
        "side by side on real loopback UDP.",
    )
    p.add_argument(
        "--rates",
        default="50000,100000,200000,max",
        help="offered rates, comma-separated, heartbeats/s or 'max' "
        "(default: 50000,100000,200000,max)",
    )
    p.add_argument("--window", type=float, default=8.0, help="seconds per window (8)")
    p.add_argument("--repeats", type=int, default=3, help="repetitions (3)")
    p.add_argument("--procs", type=int, default=200, help="fleet processes (200)")
    p.add_argument(
        "--rcvbuf",
        type=int,
        default=8 << 20,
        help="bytes of receive buffer for the original and the floors; the "
        "daemon keeps its default (8 MiB)",
    )
    p.add_argument(
        "--low-rate",
        default="1000",
        help="heartbeats/s of the default vs --batch-delay 0 comparison, "
        "0 to skip (1000)",
    )
    p.add_argument(
        "--low-window",
        type=float,
        default=20.0,
        help="seconds per low-rate window (20)",
    )
    p.add_argument(
        "--zero-loss",
        type=float,
        default=10.0,
        help="seconds of the daemon's 200k/s run at its default rcvbuf, 0 to skip",
    )
    p.add_argument(
        "--probes", type=int, default=7, help="freshness probes, idle and flood (7)"
    )
    p.add_argument(
        "--backlog",
        type=int,
        default=300_000,
        help="heartbeats queued per backlog drain, 0 to skip (300000)",
    )
    p.add_argument(
        "--backlog-rcvbuf",
        type=int,
        default=512 << 20,
        help="bytes of receive buffer for the backlog phase (512 MiB)",
    )
    p.add_argument("--no-pin", dest="pin", action="store_false", help="no pinning")
    p.add_argument("--sender-cpu", type=int, default=0, help="sender's CPU (0)")
    p.add_argument("--receiver-cpu", type=int, default=1, help="receivers' CPU (1)")
    p.add_argument(
        "--out", type=Path, help="results JSON (bench/results/e2e-DATE.json)"
    )
    p.add_argument(
        "--png", type=Path, default=ROOT / "docs" / "benchmark-e2e.png", help="plot"
    )
    p.add_argument(
        "--report-only",
        type=Path,
        metavar="RESULTS_JSON",
        help="only redraw the plot and print the tables of a results file",
    )
    args = p.parse_args(argv)
    args.rate_list = [r.strip() for r in args.rates.split(",") if r.strip()]
    if args.pin and (os.cpu_count() or 1) < 2:
        args.pin = False
    return args


def machine() -> dict[str, Any]:
    """What the run ran on."""
    import circus

    import circus_watchdog

    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "",
    )
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "circus": circus.__version__,
        "circus_watchdog": circus_watchdog.__version__,
        "compiled": circus_watchdog.compiled,
        "rmem_max": int(Path("/proc/sys/net/core/rmem_max").read_text()),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "uncommitted": _git("status", "--short", "--untracked-files=no").splitlines(),
        "loadavg_start": os.getloadavg(),
    }


def _git(*args: str) -> str:
    """git's output in the repository ("" without git)."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        res = json.loads(args.report_only.read_text())
        report.plot(res, args.png)
        print(report.markdown(res))
        return 0
    started = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {msg}", flush=True)

    now = datetime.datetime.now(datetime.timezone.utc)
    out = args.out or RESULTS / f"e2e-{now:%Y-%m-%dT%H%M}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {
        "date": now.isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.e2e", *(argv or sys.argv[1:])]),
        "machine": machine(),
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "png")},
    }
    res["args"]["report_only"] = None

    def save() -> None:
        res["runtime_seconds"] = round(time.monotonic() - started, 1)
        out.write_text(json.dumps(res, indent=1, default=str) + "\n")

    try:
        run(args, res, log, save)
    finally:
        res["machine"]["loadavg_end"] = os.getloadavg()
        save()
        log(f"results: {out}")
    report.plot(res, args.png)
    print(report.markdown(res))
    return 0


def run(
    args: argparse.Namespace,
    res: dict[str, Any],
    log: Callable[[str], None],
    save: Callable[[], None],
) -> None:
    """Every phase, saving the results after each."""
    rx_cpu = args.receiver_cpu if args.pin else None
    pin_rx = pinned(rx_cpu)
    with tempfile.TemporaryDirectory(prefix="circus-watchdog-e2e-") as tmp:
        workdir = Path(tmp)
        floors = build(workdir)
        with fleet(workdir, args.procs, rx_cpu) as fl:
            if args.pin:  # circusd and the fleet float; the driver and loadgen not
                os.sched_setaffinity(0, {args.sender_cpu})
            sender_cpu = args.sender_cpu if args.pin else None
            sender = Sender(fl.circusd.endpoint, "^fleet$", sender_cpu)
            daemon = fl.daemon("daemon")
            version = daemon.proc.status()["version"]
            log(f"fleet of {len(fl.pids)} pids under circusd; daemon {version}")
            res["daemon"] = {"version": version, "flags": daemon.flags}

            def side_by_side(rcvbuf: int, main: Daemon) -> list[Receiver]:
                return [
                    DaemonReceiver("daemon", main.proc, main.port),
                    OriginalReceiver(rcvbuf, fl.pids, pin_rx),
                    FloorReceiver(floors["floor_block"], rcvbuf, pin_rx),
                    FloorReceiver(floors["floor_sleep"], rcvbuf, pin_rx),
                ]

            receivers = side_by_side(args.rcvbuf, daemon)
            if args.rate_list:
                res["rates"] = matrix.rates(
                    receivers, sender, args.rate_list, args.window, args.repeats, log
                )
                save()
            if args.low_rate != "0":
                other = fl.daemon("daemon_per_wakeup", "--batch-delay", "0")
                pair = [
                    receivers[0],
                    DaemonReceiver(other.name, other.proc, other.port),
                ]
                res["low_rate"] = matrix.rates(
                    pair, sender, [args.low_rate], args.low_window, args.repeats, log
                )
                other.proc.stop(signal.SIGTERM)
                save()
            if args.zero_loss:
                row = matrix.window(receivers[0], sender, "200000", args.zero_loss)
                res["zero_loss"] = row
                log(f"zero loss, {args.zero_loss:g} s at 200k/s: {row}")
                save()
            if args.probes:
                res["freshness"] = matrix.freshness(
                    daemon, fl.probe, sender, "200000", args.probes, log
                )
                save()
            if args.backlog:
                big = fl.daemon("daemon", "--rcvbuf", str(args.backlog_rcvbuf))
                deep = side_by_side(args.backlog_rcvbuf, big)
                res["backlog"] = matrix.backlog(
                    deep, sender, args.backlog, args.repeats, log
                )
                save()
