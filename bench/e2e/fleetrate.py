"""``python -m bench.e2e.fleetrate``: the whole daemon at the rates fleets send.

Fleet rates: for each fleet size N, circusd runs N real processes that beat
as watched processes do (``--fleet beat``, the default; ``bench/floors/beat.c``:
each sends ``PID;TIMESTAMP`` once a second at its own random phase, so N
heartbeats/s from N independent senders) to one UDP port chosen at start.  The
receivers under test bind that port in turn, one window each: the standalone
daemon as an operator runs it (``--loop-rate 60``, with ``--dry-run`` so
nothing is killed; started afresh for each window, once it monitors the whole
fleet), circus 0.19's receive path (``original.py``) and both C floors.
Between windows the port is closed and the kernel drops the beats (unconnected
UDP: the senders see no error).  Nothing is pinned: the senders spread over
every CPU as in production.  Counted per window: what the receiver read (the
read rate is N/s by construction), its CPU per heartbeat and wake-ups per
second (context switches of all its threads).  ``--fleet loadgen`` is the
earlier set-up: the processes sleep in ``pause()`` (``bench/floors/pause.c``),
loadgen beats for every pid once a second from CPU 0, the receivers are pinned
to CPU 1 and the daemon runs through every window.

Windows are interleaved and rotated (`matrix.rates`).  Then freshness probes
(`matrix.probe_once`): with loadgen on an idle daemon and under a loadgen
flood (`matrix.freshness`); with the beating fleet, under the fleet only.  The
daemon's CPU at one heartbeat per second per pid, per 1,000 pids, is its
at-rest cost.  ``--baseline SRC`` adds a second daemon run from another source
tree (``SRC``: its ``src`` directory, put first on ``PYTHONPATH``), named
``baseline``, to the same windows: before and after a change, side by side.

Spawn: circusd starts 50 watchers x 100 processes with no plugin, with
circus-watchdog as its plugin and with circus 0.19's plugin, in rotated order:
the seconds until every process runs, circusd's CPU by then, and circusd's CPU
over the next ``REST`` seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from circus.client import CircusClient

from harness import (
    fetch_metrics,
    fetch_status,
    free_ports,
    metric,
    start_circusd,
    wait_for,
)

from . import matrix
from .accounting import cpu_seconds
from .cli import machine
from .fleet import SPAWN_POLL, Daemon, Fleet, children, fleet, fleet_port
from .floors import BEAT, FLOORS, PAUSE, build
from .receivers import (
    Counted,
    DaemonReceiver,
    DaemonRun,
    FloorReceiver,
    OriginalReceiver,
    Receiver,
    Run,
)
from .report import _fmt, paired, spread
from .sender import ROOT, Sender, pinned

Log = Callable[[str], None]
RCVBUF = 8 << 20  # the daemon's default, for the original and the floors
WARM = 1.0  # seconds a fresh daemon reads the fleet before its window
SPAWN_WATCHERS, SPAWN_PROCS = 50, 100
SPAWN_LIMIT = 300.0  # seconds for circusd to start the spawn fleet
REST = 10.0  # seconds of circusd at rest after the spawn
LISTINGS = 3  # full listings timed after the rest, with no plugin
PLUGINS = {
    "off": None,
    "circus-watchdog": "circus_watchdog.plugin.WatchDog",
    "circus-0.19": "circus.plugins.watchdog.WatchDog",
}
BASELINE = "previous build"  # the watchdog plugin from --baseline's tree


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.e2e.fleetrate")
    p.add_argument("--pids", default="1000,5000,20000", help="fleet sizes")
    p.add_argument("--window", type=float, default=10.0, help="seconds per window")
    p.add_argument("--repeats", type=int, default=3, help="repetitions")
    p.add_argument("--probes", type=int, default=7, help="freshness probes, 0: none")
    p.add_argument("--spawn-repeats", type=int, default=2, help="0: no spawn phase")
    p.add_argument(
        "--spawn-fleet",
        choices=("pause", "beat"),
        default="pause",
        help="the spawn fleet's processes: silent, or beating from their start",
    )
    p.add_argument(
        "--fleet",
        choices=("beat", "loadgen"),
        default="beat",
        help="who beats: the fleet's processes, or loadgen for them (pinned)",
    )
    p.add_argument("--watchers", type=int, default=1, help="fleet split over K")
    p.add_argument("--no-pin", dest="pin", action="store_false", help="loadgen only")
    p.add_argument("--baseline", type=Path, metavar="SRC", help="another daemon")
    p.add_argument("--out", type=Path, help="results JSON")
    p.add_argument("--report-only", type=Path, metavar="RESULTS_JSON")
    args = p.parse_args(argv)
    args.sizes = [int(n) for n in args.pids.split(",") if n.strip()]
    if args.fleet == "beat":
        args.pin = False
    return args


class FleetBeats(Sender):
    """The fleet is the sender: ``run`` only lets a window pass."""

    def __init__(self) -> None:
        super().__init__("", "", None)

    def run(
        self, port: int, rate: str, *, duration: float, count: int = 0
    ) -> dict[str, Any]:
        t0 = time.monotonic()
        time.sleep(duration)
        return {"sent": None, "rate": None, "elapsed": time.monotonic() - t0}


class FixedRun(DaemonRun):
    """A daemon started for one window on the fleet's port, stopped after it."""

    def finish(self) -> Counted:
        try:
            return super().finish()
        finally:
            self._daemon.stop(signal.SIGTERM)


@dataclass
class FixedDaemon:
    """A daemon (this tree's, or ``src``'s) on the fleet's fixed port."""

    kind: str
    fl: Fleet
    port: int
    src: Path | None = None

    def start(self) -> Daemon:
        return _start_daemon(self.fl, self.kind, self.src, self.port)

    def open(self) -> Run:
        daemon = self.start()
        time.sleep(WARM)  # its read schedule settles on the fleet's traffic
        return FixedRun(self.kind, daemon.proc, self.port)


def rates(workdir: Path, n: int, args: argparse.Namespace, log: Log) -> dict[str, Any]:
    """The four receivers on a fleet of ``n`` pids beating once a second."""
    if args.fleet == "beat":
        return beat_rates(workdir, n, args, log)
    exe = build(workdir, (*FLOORS, PAUSE))
    rx_cpu = 1 if args.pin else None
    (workdir / f"fleet{n}").mkdir()
    with fleet(
        workdir / f"fleet{n}", n, rx_cpu, str(exe[PAUSE]), watchers=args.watchers
    ) as fl:
        if args.pin:
            os.sched_setaffinity(0, {0})
        sender = Sender(fl.circusd.endpoint, r"^fleet\d*$", 0 if args.pin else None)
        daemon = fl.daemon("daemon", "--loop-rate", "60")
        version = daemon.proc.status()["version"]
        log(f"{n} pids under circusd; daemon {version}")
        pin = pinned(rx_cpu)
        receivers = [
            DaemonReceiver("daemon", daemon.proc, daemon.port),
            *_baseline(fl, args.baseline, log),
            OriginalReceiver(RCVBUF, fl.pids, pin),
            FloorReceiver(exe["floor_block"], RCVBUF, pin),
            FloorReceiver(exe["floor_sleep"], RCVBUF, pin),
        ]
        rows = matrix.rates(receivers, sender, [str(n)], args.window, args.repeats, log)
        out: dict[str, Any] = {"pids": n, "version": version, "rows": rows}
        if args.probes:
            out["freshness"] = matrix.freshness(
                daemon, fl.probe, sender, str(n), args.probes, log
            )
    return out


def beat_rates(
    workdir: Path, n: int, args: argparse.Namespace, log: Log
) -> dict[str, Any]:
    """`rates` with a fleet of ``n`` beat processes, nothing pinned."""
    exe = build(workdir, (*FLOORS, PAUSE, BEAT))
    port = fleet_port()
    (workdir / f"fleet{n}").mkdir()
    cmd = f"{exe[BEAT]} {port}"
    probe_cmd = str(exe[PAUSE])
    with fleet(workdir / f"fleet{n}", n, None, cmd, probe_cmd, args.watchers) as fl:
        log(f"{n} pids under circusd beat to port {port}")
        daemons = [FixedDaemon("daemon", fl, port)]
        if args.baseline is not None:
            daemons.append(FixedDaemon("baseline", fl, port, args.baseline))
        versions = {}
        for rx in daemons:  # its version, and a first start-up off the clock
            daemon = rx.start()
            versions[rx.kind] = daemon.proc.status()["version"]
            daemon.proc.stop(signal.SIGTERM)
            log(f"{rx.kind} {versions[rx.kind]}")
        receivers: list[Receiver] = [
            *daemons,
            OriginalReceiver(RCVBUF, fl.pids, port=port),
            *(FloorReceiver(exe[kind], RCVBUF, port=port) for kind in FLOORS),
        ]
        rows = matrix.rates(
            receivers, FleetBeats(), [str(n)], args.window, args.repeats, log
        )
        out: dict[str, Any] = {"pids": n, "version": versions["daemon"], "rows": rows}
        if "baseline" in versions:
            out["baseline_version"] = versions["baseline"]
        if args.probes:
            daemon = _start_daemon(fl, "daemon", None, port)
            try:
                out["freshness"] = fleet_freshness(daemon, fl.probe, args.probes, log)
            finally:
                daemon.proc.stop(signal.SIGTERM)
    return out


def fleet_freshness(daemon: Daemon, probe: int, tries: int, log: Log) -> dict[str, Any]:
    """Probe delays under the beating fleet (no idle daemon: the fleet beats)."""
    delays, hows = [], set()
    for _ in range(tries):
        time.sleep(matrix.PROBE_INTERVAL)
        delay, how = matrix.probe_once(daemon, probe)
        delays.append(round(delay, 6))
        hows.add(how)
    log(f"freshness under the fleet: {', '.join(f'{d * 1e3:.2f}' for d in delays)} ms")
    flood = {"delays": delays, "method": sorted(hows)}
    return {"tries": tries, "flood_rate": "fleet", "flood": flood}


def _start_daemon(fl: Fleet, name: str, src: Path | None, port: int = 0) -> Daemon:
    # This tree's daemon, or another source tree's (its src directory first on
    # the path), on UDP ``port`` (0: a free one).
    if src is None:
        return fl.daemon(name, "--loop-rate", "60", port=port)
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(src.resolve())
    try:
        return fl.daemon(name, "--loop-rate", "60", port=port)
    finally:
        os.environ.pop("PYTHONPATH")
        if saved is not None:
            os.environ["PYTHONPATH"] = saved


def _baseline(fl: Any, src: Path | None, log: Log) -> list[DaemonReceiver]:
    # The loadgen set-up's baseline: runs through every window.
    if src is None:
        return []
    daemon = _start_daemon(fl, "baseline", src)
    log(f"baseline {daemon.proc.status()['version']} from {src}")
    return [DaemonReceiver("baseline", daemon.proc, daemon.port)]


def _plugin(circusd: psutil.Process) -> psutil.Process | None:
    # circusd's plugin process (circus runs it with ``-c ...plugins.main()``).
    for kid in circusd.children():
        with contextlib.suppress(psutil.Error):
            if "plugins.main()" in " ".join(kid.cmdline()):
                return kid
    return None


def _plugin_core(plugin: psutil.Process | None) -> str | None:
    # The compiled core the plugin process mapped: which tree it runs.
    with contextlib.suppress(psutil.Error):
        if plugin is not None:
            maps = plugin.memory_maps()
            return next((m.path for m in maps if "_core_c" in m.path), None)
    return None


def spawn_once(
    workdir: Path, plugin: str | None, src: Path | None = None, beat: bool = False
) -> dict[str, Any]:
    """circusd starting the spawn fleet with ``plugin`` (None: no plugin),
    imported from the source tree ``src`` (None: this one); with ``beat`` its
    processes beat to the plugin's port from their start, as a fleet does."""
    exe = build(workdir, (PAUSE, BEAT))
    udp, (metrics,) = fleet_port(), free_ports(1)
    kind = BEAT if beat else PAUSE
    cmd = f"{exe[BEAT]} {udp}" if beat else str(exe[PAUSE])
    sections = "".join(
        f"[watcher:w{i}]\ncmd = {cmd}\nnumprocesses = {SPAWN_PROCS}\n\n"
        for i in range(SPAWN_WATCHERS)
    )
    if plugin is not None:
        sections += f"[plugin:watchdog]\nuse = {plugin}\nport = {udp}\n"
        if plugin.startswith("circus_watchdog"):
            sections += f"dry_run = true\nmetrics_port = {metrics}\n"
    want = SPAWN_WATCHERS * SPAWN_PROCS
    saved = os.environ.get("PYTHONPATH")
    if src is not None:  # circus hands circusd's sys.path to its plugins
        os.environ["PYTHONPATH"] = str(src.resolve())
    try:
        circusd = start_circusd(workdir, sections)
    finally:
        os.environ.pop("PYTHONPATH", None)
        if saved is not None:
            os.environ["PYTHONPATH"] = saved
    watchdog = plugin is not None and plugin.startswith("circus_watchdog")
    try:
        proc = psutil.Process(circusd.proc.pid)

        def spawned() -> float | None:
            return time.time() if children(proc.pid, kind) >= want else None

        done = wait_for(spawned, SPAWN_LIMIT, SPAWN_POLL)
        cpu_spawn = cpu_seconds(proc.pid)
        plugin_proc = _plugin(proc)
        plugin_cpu = None if plugin_proc is None else cpu_seconds(plugin_proc.pid)
        time.sleep(REST)
        cpu_rest = cpu_seconds(proc.pid) - cpu_spawn
        status = fetch_status(metrics) if watchdog else None
        series = fetch_metrics(metrics) if watchdog else None
        core = _plugin_core(plugin_proc)
        listing = None if plugin else _listing_cpu(circusd.endpoint, proc, cpu_rest)
    finally:
        circusd.stop()
    return {
        "spawn_seconds": round(done - proc.create_time(), 2),
        "circusd_cpu_spawn": round(cpu_spawn, 2),
        "circusd_cpu_rest_percent": round(cpu_rest / REST * 100, 2),
        "monitored": None if status is None else len(status["pids"]),
        "resyncs": None if series is None else metric(series, "resyncs_total"),
        "plugin_core": core,
        "plugin_cpu_spawn": None if plugin_cpu is None else round(plugin_cpu, 2),
        "circusd_cpu_full_listing": listing,
    }


def _listing_cpu(endpoint: str, proc: psutil.Process, cpu_rest: float) -> float:
    # circusd's CPU seconds for one full listing (``list``, then ``list
    # name=W`` for each watcher: what a re-sync asks), beyond its CPU at rest.
    client = CircusClient(endpoint=endpoint, timeout=60)
    try:
        start, t0 = cpu_seconds(proc.pid), time.monotonic()
        for _ in range(LISTINGS):
            reply = client.call({"command": "list", "properties": {}})
            for name in reply["watchers"]:
                client.call({"command": "list", "properties": {"name": name}})
        elapsed = time.monotonic() - t0
        spent = cpu_seconds(proc.pid) - start - cpu_rest / REST * elapsed
    finally:
        client.stop()
    return round(spent / LISTINGS, 3)


def spawns(
    workdir: Path,
    repeats: int,
    log: Log,
    baseline: Path | None = None,
    beat: bool = False,
) -> list[dict[str, Any]]:
    """Every plugin setting ``repeats`` times, order rotated; with a
    ``baseline`` source tree, its watchdog plugin too; ``beat``: see
    `spawn_once`."""
    rows = []
    plugins = {name: (use, None) for name, use in PLUGINS.items()}
    if baseline is not None:
        plugins[BASELINE] = (PLUGINS["circus-watchdog"], baseline)
    names = list(plugins)
    for rep in range(repeats):
        for pos in range(len(names)):
            name = names[(rep + pos) % len(names)]
            sub = workdir / f"spawn{rep}-{pos}"
            sub.mkdir()
            row = spawn_once(sub, *plugins[name], beat=beat)
            row.update(plugin=name, repeat=rep, position=pos)
            log(f"spawn #{rep} {name:>16}: {row}")
            rows.append(row)
    return rows


def summary(res: dict[str, Any]) -> dict[str, Any]:
    """Medians [min-max] per fleet size and receiver, and the paired ratios."""
    out: dict[str, Any] = {}
    for fl in res.get("fleets", []):
        rows, n = fl["rows"], fl["pids"]
        cell: dict[str, Any] = {}
        for kind in sorted({r["receiver"] for r in rows}):
            mine = [r for r in rows if r["receiver"] == kind]
            cell[kind] = {
                key: spread(r.get(key) for r in mine)
                for key in (
                    "ran_us_per_hb",
                    "cpu_us_per_hb",
                    "wakeups_per_s",
                    "processed_rate",
                    "cpu",
                )
            }
        daemon_cpu = cell["daemon"]["cpu"]
        if daemon_cpu:  # % of a core per 1,000 pids at one heartbeat/s per pid
            window = rows[0]["window"]
            percent = daemon_cpu["median"] / window * 100
            cell["daemon_percent_per_1000_pids"] = percent * 1000 / n
        pairs = [("original", "daemon"), ("daemon", "floor_sleep")]
        if "baseline" in cell:
            pairs += [("original", "baseline"), ("baseline", "daemon")]
        for num, den in pairs:
            for key in ("ran_us_per_hb", "cpu_us_per_hb"):
                ratio = paired(rows, num, den, key).get(str(n))
                cell[f"{num} / {den} ({key})"] = ratio
        if "freshness" in fl:
            cell["freshness_ms"] = {
                k: spread(d * 1e3 for d in fl["freshness"][k]["delays"])
                for k in ("idle", "flood")
                if k in fl["freshness"]
            }
        out[str(n)] = cell
    rows = res.get("spawn", [])
    off = {r["repeat"]: r["circusd_cpu_spawn"] for r in rows if r["plugin"] == "off"}
    for name in [*PLUGINS, BASELINE]:
        mine = [r for r in rows if r["plugin"] == name]
        if mine:
            keys = ("spawn_seconds", "circusd_cpu_spawn", "circusd_cpu_rest_percent")
            cell = {k: spread(r[k] for r in mine) for k in keys}
            cell["plugin_cpu_spawn"] = spread(r.get("plugin_cpu_spawn") for r in mine)
            for key in ("circusd_cpu_full_listing", "resyncs"):
                cell[key] = spread(r.get(key) for r in mine)
            # circusd's CPU to spawn with this plugin / with none, same repeat
            cell["cpu_spawn / off"] = spread(
                r["circusd_cpu_spawn"] / off[r["repeat"]]
                for r in mine
                if off.get(r["repeat"])
            )
            out[f"spawn {name}"] = cell
    return out


def markdown(res: dict[str, Any]) -> str:
    """The tables of a run's summary (medians [min-max])."""
    summ = summary(res)
    out = [
        "| pids = heartbeats/s | receiver | CPU us/heartbeat (schedstat) "
        "| CPU us/heartbeat (psutil) | wake-ups/s | read/s |",
        "|--:|---|--:|--:|--:|--:|",
    ]
    ratios = [
        "| pids | original / daemon | daemon / floor_sleep | freshness idle, "
        "ms | freshness under the fleet, ms | daemon % of a core per 1,000 pids |",
        "|--:|--:|--:|--:|--:|--:|",
    ]
    for n, cell in summ.items():
        if n.startswith("spawn"):
            continue
        for kind in ("daemon", "baseline", "original", "floor_block", "floor_sleep"):
            if kind not in cell:
                continue
            c = cell[kind]
            out.append(
                f"| {int(n):,} | {kind} | {_fmt(c['ran_us_per_hb'])} | "
                f"{_fmt(c['cpu_us_per_hb'])} | {_fmt(c['wakeups_per_s'], '.0f')} | "
                f"{_fmt(c['processed_rate'], '.0f')} |"
            )
        fresh = cell.get("freshness_ms", {})
        ratios.append(
            f"| {int(n):,} | {_fmt(cell['original / daemon (ran_us_per_hb)'])} | "
            f"{_fmt(cell['daemon / floor_sleep (ran_us_per_hb)'])} "
            f"({_fmt(cell['daemon / floor_sleep (cpu_us_per_hb)'])} psutil) | "
            f"{_fmt(fresh.get('idle'))} | {_fmt(fresh.get('flood'))} | "
            f"{cell.get('daemon_percent_per_1000_pids', 0):.2g} |"
        )
    spawn = [
        "| plugin | spawn seconds | circusd CPU s by then | / off, same repeat "
        "| the plugin's own CPU s by then | circusd % at rest | re-syncs |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for name in [*PLUGINS, BASELINE]:
        c = summ.get(f"spawn {name}")
        if c:
            cpu, rest = c["circusd_cpu_spawn"], c["circusd_cpu_rest_percent"]
            spawn.append(
                f"| {name} | {_fmt(c['spawn_seconds'])} | {_fmt(cpu)} | "
                f"{_fmt(c['cpu_spawn / off'])} | {_fmt(c.get('plugin_cpu_spawn'))} | "
                f"{_fmt(rest)} | {_fmt(c.get('resyncs'))} |"
            )
    listing = (summ.get("spawn off") or {}).get("circusd_cpu_full_listing")
    if listing:
        spawn += [
            "",
            f"circusd CPU for one full listing of the {SPAWN_WATCHERS} x "
            f"{SPAWN_PROCS} fleet: {_fmt(listing)} s",
        ]
    return "\n".join([*out, "", *ratios, "", *spawn])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        print(markdown(json.loads(args.report_only.read_text())))
        return 0
    started = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {msg}", flush=True)

    now = datetime.datetime.now(datetime.timezone.utc)
    out = args.out or ROOT / "bench" / "results" / f"fleet-{now:%Y-%m-%dT%H%M}.json"
    res: dict[str, Any] = {
        "date": now.isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.e2e.fleetrate", *sys.argv[1:]]),
        "machine": machine(),
        "args": {
            k: v for k, v in vars(args).items() if k not in ("out", "report_only")
        },
        "fleets": [],
    }

    def save() -> None:
        res["runtime_seconds"] = round(time.monotonic() - started, 1)
        res["summary"] = summary(res)
        out.write_text(json.dumps(res, indent=1, default=str) + "\n")

    try:
        with tempfile.TemporaryDirectory(prefix="circus-watchdog-fleet-") as tmp:
            for n in args.sizes:
                res["fleets"].append(rates(Path(tmp), n, args, log))
                save()
            if args.spawn_repeats:
                res["spawn"] = spawns(
                    Path(tmp),
                    args.spawn_repeats,
                    log,
                    args.baseline,
                    args.spawn_fleet == "beat",
                )
    finally:
        res["machine"]["loadavg_end"] = os.getloadavg()
        save()
        log(f"results: {out}")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
