"""The ``circus-watchdog-loadgen`` command line: options, checks, workers, report."""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import multiprocessing
import os
import queue
import re
import socket
import sys
import threading
import time
from collections.abc import Sequence
from multiprocessing.queues import Queue
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event as EventType
from typing import Any, TextIO

from circus_watchdog.client import parse_address
from circus_watchdog.pids import PID_MAX

from . import flood
from .flood import Plan, Result

DEFAULT_TARGET = "127.0.0.1:1664"
DEFAULT_DURATION = 10.0  # seconds, when neither --count nor --duration is given
SAFETY_DURATION = 3600.0  # seconds, the time bound of a run given only --count
DEFAULT_SNDBUF = 4 * 1024 * 1024  # bytes
MAX_WORKERS = 256
RESULT_GRACE = 10.0  # seconds past the duration to wait for worker results
REPORT_EVERY = 0.1  # seconds between progress bar updates (at most 10/s)
EXIT_USAGE = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A bad option value: exit status 2, the message names the option."""


class RunError(Exception):
    """The run could not start or a worker failed: exit status 1."""


# -- option parsing ---------------------------------------------------------


def parse_target(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` or ``[IPV6]:PORT`` into host and port."""
    try:
        return parse_address(text, "--target")
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def is_loopback(ip: str) -> bool:
    """Whether ``ip`` (numeric, IPv4 or IPv6) is a loopback address."""
    addr = ipaddress.ip_address(ip.partition("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


def resolve_target(text: str, allow_remote: bool) -> tuple[int, tuple[Any, ...], str]:
    """Resolve ``--target`` to (family, sockaddr, display); refuse non-loopback."""
    host, port = parse_target(text)
    try:
        infos = socket.getaddrinfo(
            host, port, socket.AF_UNSPEC, socket.SOCK_DGRAM, socket.IPPROTO_UDP
        )
    except (socket.gaierror, UnicodeError) as exc:
        raise UsageError(f"--target {text!r}: cannot resolve {host!r}: {exc}") from None
    infos = [i for i in infos if i[0] in (socket.AF_INET, socket.AF_INET6)]
    if not infos:
        raise UsageError(f"--target {text!r}: {host!r} has no IPv4 or IPv6 address")
    family, _, _, _, sockaddr = infos[0]
    ip = str(sockaddr[0])
    if not allow_remote and not is_loopback(ip):
        raise UsageError(
            f"--target {text!r}: {ip} is not a loopback address; loadgen only "
            "floods 127.0.0.0/8 and ::1 unless --allow-remote is given"
        )
    display = f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"
    return family, tuple(sockaddr), display


def parse_rate(text: str) -> float | None:
    """``max`` (None) or a positive number of datagrams per second."""
    if text.strip().lower() == "max":
        return None
    try:
        rate = float(text)
    except ValueError:
        raise UsageError(f"--rate {text!r}: expected datagrams/s or 'max'") from None
    if not (math.isfinite(rate) and rate > 0):
        raise UsageError(f"--rate {text!r}: must be > 0 datagrams/s")
    return rate


def parse_mix(text: str) -> tuple[float, float]:
    """``malformed=F,unknown=F`` into the two fractions (each 0..1, sum <= 1)."""
    shares = {"malformed": 0.0, "unknown": 0.0}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in shares:
            raise UsageError(
                f"--mix {text!r}: expected malformed=F,unknown=F, got {item!r}"
            )
        try:
            share = float(value)
        except ValueError:
            raise UsageError(
                f"--mix {text!r}: {key} {value!r} is not a number"
            ) from None
        if not (math.isfinite(share) and 0.0 <= share <= 1.0):
            raise UsageError(f"--mix {text!r}: {key} must be a fraction in 0..1")
        shares[key] = share
    if shares["malformed"] + shares["unknown"] > 1.0 + 1e-9:
        raise UsageError(f"--mix {text!r}: malformed + unknown must be <= 1")
    return shares["malformed"], shares["unknown"]


def fetch_pids(endpoint: str, watchers: str, timeout: float) -> tuple[int, ...]:
    """Pids of the watchers matching ``watchers`` (re.match) in a running circusd."""
    try:
        regex = re.compile(watchers)
    except re.error as exc:
        raise UsageError(f"--watchers {watchers!r}: bad regex: {exc}") from None
    # circus pulls in zmq and tornado: only --endpoint pays for them.
    from circus.client import CircusClient, make_message  # noqa: PLC0415
    from circus.exc import CallError  # noqa: PLC0415

    client = CircusClient(endpoint=endpoint, timeout=timeout)
    try:

        def call(command: str, **props: Any) -> dict[str, Any]:
            what = " ".join([command, *(f"{k}={v}" for k, v in props.items())])
            try:
                answer = client.call(make_message(command, **props))
            except CallError as exc:
                raise RunError(
                    f"--endpoint {endpoint}: `{what}` failed within {timeout:g} s: "
                    f"{exc}"
                ) from None
            if not isinstance(answer, dict) or answer.get("status") != "ok":
                raise RunError(f"--endpoint {endpoint}: `{what}` answered {answer!r}")
            return answer

        names = [str(w) for w in call("list").get("watchers", [])]
        pids: list[int] = []
        for name in names:
            if regex.match(name):
                pids.extend(int(p) for p in call("list", name=name).get("pids", []))
    finally:
        client.stop()
    found = tuple(sorted({p for p in pids if 1 <= p <= PID_MAX}))
    if not found:
        raise RunError(
            f"--endpoint {endpoint}: no pid in the watchers matching {watchers!r} "
            f"(watchers: {', '.join(names) or 'none'})"
        )
    return found


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of circus-watchdog-loadgen."""
    p = argparse.ArgumentParser(
        prog="circus-watchdog-loadgen",
        description="Flood a circus-watchdog with UDP heartbeats (PID;TIMESTAMP), "
        "from loopback to loopback only.",
        epilog="Example: circus-watchdog-loadgen --rate 100000 --duration 10 "
        "(see docs/loadgen.md).",
    )
    p.add_argument(
        "--target",
        default=DEFAULT_TARGET,
        metavar="HOST:PORT",
        help="where to send: IPv4 HOST:PORT or [IPV6]:PORT, a loopback address "
        f"unless --allow-remote (default: {DEFAULT_TARGET})",
    )
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a --target that is not a loopback address (flag, no unit)",
    )
    who = p.add_mutually_exclusive_group()
    who.add_argument(
        "--pids",
        type=positive_int,
        default=None,
        metavar="N",
        help="number of synthetic pids to send heartbeats for, PID-BASE.."
        "PID-BASE+N-1 (pids; default: 1000)",
    )
    who.add_argument(
        "--endpoint",
        metavar="URL",
        help="circusd controller endpoint (a tcp:// URL) to read the pids of the "
        "watchers matching --watchers from, instead of --pids",
    )
    p.add_argument(
        "--pid-base",
        type=positive_int,
        default=1000,
        metavar="PID",
        help="first synthetic pid (a pid; default: 1000)",
    )
    p.add_argument(
        "--watchers",
        default=".*",
        metavar="REGEX",
        help="with --endpoint: watcher names to take pids from, matched from the "
        "start like watchers_regex (a regex; default: .*)",
    )
    p.add_argument(
        "--endpoint-timeout",
        type=positive_float,
        default=5.0,
        metavar="S",
        help="with --endpoint: how long to wait for each circusd answer "
        "(seconds; default: 5)",
    )
    p.add_argument(
        "--rate",
        default="max",
        metavar="PPS",
        help="datagrams per second in total across workers, or 'max' for as "
        "fast as the socket takes them (datagrams/s; default: max)",
    )
    p.add_argument(
        "--duration",
        type=positive_float,
        default=None,
        metavar="S",
        help=f"stop after S seconds (seconds; default: {DEFAULT_DURATION:g} s when "
        f"--count is not given, else a {SAFETY_DURATION:g} s safety bound)",
    )
    p.add_argument(
        "--count",
        type=positive_int,
        default=None,
        metavar="N",
        help="stop after N datagrams in total, split exactly across workers "
        "(datagrams; default: no count bound, see --duration)",
    )
    p.add_argument(
        "--mix",
        default="",
        metavar="malformed=F,unknown=F",
        help="fractions of datagrams that are malformed and that are heartbeats "
        "of unknown pids, the rest valid heartbeats (fractions 0..1; default: "
        "all valid)",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        metavar="N",
        help=f"sender processes, each with its own socket and a 1/N share of "
        f"--rate and --count (processes, 1..{MAX_WORKERS}; default: 1, in-process)",
    )
    p.add_argument(
        "--sndbuf",
        type=positive_int,
        default=DEFAULT_SNDBUF,
        metavar="BYTES",
        help="SO_SNDBUF asked for each socket, capped by net.core.wmem_max "
        f"(bytes; default: {DEFAULT_SNDBUF})",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="INT",
        help="seed of the random unknown pids (an integer; default: 0)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (sent, elapsed in seconds, rate in "
        "datagrams/s, workers, mix, target) instead of the text report (flag)",
    )
    return p


# -- the run ----------------------------------------------------------------


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


def run_inline(plan: Plan, progress: Progress) -> list[Result]:
    """One worker, in this process."""
    try:
        sock = flood.open_socket(plan)
    except OSError as exc:
        raise RunError(f"cannot open a socket to --target: {exc}") from None
    with sock:
        progress.restart()

        def report(sent: int) -> bool:
            progress.update(sent)
            return False

        return [flood.run(plan, sock, report)]


def run_processes(plans: Sequence[Plan], progress: Progress) -> list[Result]:
    """One process per plan (spawn context), started together behind a barrier.

    Each worker opens its socket, then waits at ``barrier`` with this process:
    the flood starts when every socket is open (a worker that cannot open one
    puts an error on ``results`` and breaks the barrier). ``sent[i]`` is worker
    i's running count, ``stop`` asks them all to stop (Ctrl-C), and each puts
    its `Result` on ``results``.
    """
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(plans) + 1, timeout=flood.STARTUP_TIMEOUT)
    stop = ctx.Event()
    results: Queue[tuple[int, Result | str]] = ctx.Queue()
    sent = [ctx.Value("q", 0, lock=False) for _ in plans]
    procs: list[multiprocessing.context.SpawnProcess] = []
    try:
        for plan, counter in zip(plans, sent, strict=True):
            proc = ctx.Process(
                target=flood.worker_main,
                args=(plan, flood.Control(barrier, stop, counter, results)),
                name=f"loadgen-worker-{plan.index}",
                daemon=True,
            )
            proc.start()
            procs.append(proc)
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            raise RunError(_start_failure(results, len(plans))) from None
        progress.restart()
        return _collect(plans, procs, sent, stop, results, progress)
    finally:
        stop.set()
        for proc in procs:
            proc.join(timeout=2.0)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=2.0)
            proc.close()
        results.close()
        results.join_thread()


def _start_failure(results: Queue[tuple[int, Result | str]], workers: int) -> str:
    """Why the start barrier broke: a worker's error, or the start timeout."""
    try:
        _, detail = results.get(timeout=1.0)
    except queue.Empty:
        return f"the {workers} workers did not all start in time"
    if isinstance(detail, str):
        return f"cannot open a socket to --target: {detail}"
    return "a worker did not start"


def _collect(
    plans: Sequence[Plan],
    procs: Sequence[multiprocessing.context.SpawnProcess],
    sent: Sequence[Synchronized[int]],
    stop: EventType,
    results: Queue[tuple[int, Result | str]],
    progress: Progress,
) -> list[Result]:
    done: dict[int, Result] = {}
    deadline = time.monotonic() + plans[0].duration + RESULT_GRACE
    while len(done) < len(plans) and time.monotonic() < deadline:
        try:
            index, result = results.get(timeout=REPORT_EVERY)
        except queue.Empty:
            # A worker that exited without a result died (its queue is flushed
            # before it exits, so a result it put is already readable).
            for i, proc in enumerate(procs):
                if i not in done and proc.exitcode is not None and results.empty():
                    done[i] = Result(worker=i, error="worker died")
        except KeyboardInterrupt:
            if stop.is_set():
                raise
            stop.set()
            deadline = min(deadline, time.monotonic() + RESULT_GRACE)
        else:
            if isinstance(result, Result):
                done[index] = result
        progress.update(sum(counter.value for counter in sent))
    late = "no result in time"
    return [done.get(i) or Result(worker=i, error=late) for i in range(len(plans))]


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
