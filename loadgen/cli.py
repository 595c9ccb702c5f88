"""The ``circus-watchdog-loadgen`` command: checks every option, then runs the
workers and prints the report (options, workers and report are modules)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from circus_watchdog.pids import PID_MAX

from . import flood
from .flood import Plan
from .options import (
    DEFAULT_DURATION,
    MAX_WORKERS,
    SAFETY_DURATION,
    RunError,
    UsageError,
    build_parser,
    fetch_pids,
    parse_mix,
    parse_rate,
    resolve_target,
)
from .report import Progress, render, summary
from .workers import run_inline, run_processes

EXIT_USAGE = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


def main(argv: list[str] | None = None) -> int:
    """Run circus-watchdog-loadgen; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return _main(args)
    except UsageError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RunError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:
        # The reader of the report went away (`| head`); the Python docs'
        # recipe: point stdout at devnull so the exit flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED


def _main(args: argparse.Namespace) -> int:
    # Every check comes before the first socket: a refused target sends nothing.
    if args.workers > MAX_WORKERS:
        raise UsageError(f"--workers {args.workers}: at most {MAX_WORKERS}")
    rate = parse_rate(args.rate)
    mix = parse_mix(args.mix)
    if args.endpoint is None and args.watchers != ".*":
        raise UsageError("--watchers needs --endpoint")
    npids = 1000 if args.pids is None else args.pids
    if args.endpoint is None and args.pid_base + npids - 1 > PID_MAX:
        raise UsageError(
            f"--pid-base {args.pid_base} + --pids {npids}: pids go past {PID_MAX}"
        )
    family, sockaddr, target = resolve_target(args.target, args.allow_remote)
    if args.duration is not None:
        duration = args.duration
    else:
        duration = SAFETY_DURATION if args.count is not None else DEFAULT_DURATION
    if args.endpoint is not None:
        pids = fetch_pids(args.endpoint, args.watchers, args.endpoint_timeout)
    else:
        pids = tuple(range(args.pid_base, args.pid_base + npids))
    n = args.workers
    counts: list[int | None] = (
        [None] * n if args.count is None else list(flood.split(args.count, n))
    )
    plans = [
        Plan(
            index=i,
            family=family,
            sockaddr=sockaddr,
            pids=pids,
            rate=None if rate is None else rate / n,
            count=counts[i],
            duration=duration,
            malformed=mix[0],
            unknown=mix[1],
            sndbuf=args.sndbuf,
            seed=args.seed * MAX_WORKERS + i,
        )
        for i in range(n)
    ]
    progress = Progress(
        sys.stdout, sys.stdout.isatty() and not args.json, args.count, duration
    )
    try:
        results = (
            run_inline(plans[0], progress) if n == 1 else run_processes(plans, progress)
        )
    finally:
        progress.close()
    report = summary(results, target, rate, args.count, duration, mix)
    if args.json:
        print(json.dumps(report))
    else:
        print(render(report))
    if any(r.error for r in results):
        return EXIT_FAILED
    return EXIT_INTERRUPTED if report["interrupted"] else 0
