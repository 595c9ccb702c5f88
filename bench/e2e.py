"""End-to-end benchmark: every receiver side by side on real loopback UDP.

``python bench/e2e.py`` (about 4-5 minutes; ``--quick`` for a 30-40 s smoke
run) measures, in one run:

1. **Fixed rates.**  For each offered rate (50k, 100k, 200k heartbeats/s and
   ``max``), each receiver (bench/receivers.py: the original plugin's receive
   path, circus-watchdog's engine on the pure and on the compiled core, and the
   count-only recvmmsg floor) reads a loadgen flood for ``--window`` seconds:
   processed heartbeats/s, loss (sent minus counted), kernel drops (the
   socket's drop count from /proc/net/udp, the RcvbufErrors delta of
   /proc/net/snmp, and SO_RXQ_OVFL as the core saw it) and receiver CPU per
   heartbeat (getrusage in the receiver).  Receiver and sender are pinned to
   different CPUs (``--no-pin`` to let them float).
2. **Backlog.**  Each receiver's socket (a large buffer) is filled with
   ``--backlog`` heartbeats while it does not read, then it drains them alone:
   capacity and CPU per heartbeat without a sender competing for the CPU.
3. **Half the ceiling.**  The compiled core and the floor offered half the
   ceiling (the floor's backlog heartbeats per CPU-second) for ``--window``
   seconds; one sender may not get there, what it reached is reported.
4. **Standalone daemon.**  ``circus-watchdog`` against a real circusd running
   ``--procs`` demo workers, flooded with their real pids: processed
   heartbeats/s, drops, CPU and kills, from its /metrics.

Results go to bench/results/e2e-<date>.json; the plot (docs/benchmark-e2e.png)
and the markdown tables come from that file, again with
``python bench/e2e.py --plot-only bench/results/e2e-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from receivers import KINDS, free_udp_port, udp_socket_stats

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PYTHON = sys.executable
LABELS = {
    "original": "original plugin",
    "py": "circus-watchdog, pure core",
    "c": "circus-watchdog, compiled core",
    "floor": "recvmmsg floor (count only)",
}
COLORS = {"original": "#d62728", "py": "#ff7f0e", "c": "#2ca02c", "floor": "#7f7f7f"}
PID_BASE = 1000
READY_TIMEOUT = 30.0  # seconds for a receiver to start
REPLY_TIMEOUT = 60.0  # seconds for a receiver to answer a command
LOADGEN_GRACE = 30.0  # seconds past the window before loadgen is killed
FILL_LIMIT = 120.0  # seconds to queue a backlog
SPAWN_LIMIT = 180.0  # seconds for circusd to start every worker
SYNC_LIMIT = 60.0  # seconds for the daemon to monitor every worker
SETTLE_LIMIT = 20.0  # seconds for the daemon to read what is queued


# -- the machine ----------------------------------------------------------------


def read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def machine() -> dict[str, Any]:
    """What the run ran on."""
    import circus
    import tornado
    import uvloop

    import circus_watchdog

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "memory_bytes": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "circus": circus.__version__,
        "tornado": tornado.version,
        "uvloop": getattr(uvloop, "__version__", ""),
        "circus_watchdog": circus_watchdog.__version__,
        "compiled": circus_watchdog.compiled,
        "rmem_max": read_int("/proc/sys/net/core/rmem_max"),
        "rmem_default": read_int("/proc/sys/net/core/rmem_default"),
        "wmem_max": read_int("/proc/sys/net/core/wmem_max"),
        "loadavg_start": os.getloadavg(),
    }


def rcvbuf_errors() -> int:
    """/proc/net/snmp Udp RcvbufErrors: datagrams dropped on full sockets, host-wide."""
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines()]
    udp = [cols for cols in lines if cols[0] == "Udp:"]
    return int(udp[1][udp[0].index("RcvbufErrors")])


CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def cpu_stat() -> dict[str, Any]:
    """Jiffies of every CPU by kind (/proc/stat), the children's CPU seconds
    (a finished loadgen) and the time."""
    per_cpu = []
    for line in Path("/proc/stat").read_text().splitlines():
        if re.match(r"cpu\d", line):
            per_cpu.append(
                dict(zip(CPU_FIELDS, map(int, line.split()[1:9]), strict=True))
            )
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"cpus": per_cpu, "children": ru.ru_utime + ru.ru_stime}


def cpu_use(
    before: dict[str, Any], after: dict[str, Any], receiver_cpu: float
) -> dict[str, Any]:
    """Where the CPU time went during a window, in CPU-seconds per second."""
    hz = os.sysconf("SC_CLK_TCK")
    spans = [
        {k: (a[k] - b[k]) / hz for k in CPU_FIELDS}
        for b, a in zip(before["cpus"], after["cpus"], strict=True)
    ]
    wall = max(sum(s.values()) for s in spans) or 1.0
    sender = after["children"] - before["children"]
    tasks = sum(s["user"] + s["nice"] + s["system"] for s in spans)
    return {
        "busy": [round(1 - (s["idle"] + s["iowait"]) / wall, 3) for s in spans],
        "sender": round(sender / wall, 3),
        "receiver": round(receiver_cpu / wall, 3),
        "softirq": round(sum(s["softirq"] + s["irq"] for s in spans) / wall, 3),
        "steal": round(sum(s["steal"] for s in spans) / wall, 3),
        # Everything else that ran: the other tenants of this machine.
        "others": round(max(tasks - sender - receiver_cpu, 0.0) / wall, 3),
    }


def build_floor(workdir: Path) -> Path:
    """bench/floor.c compiled as bench/conftest.py does it."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise SystemExit("gcc not found on PATH: cannot build bench/floor.c")
    out = workdir / "floor.so"
    subprocess.run(
        [gcc, "-O2", "-shared", "-fPIC", "-o", str(out), str(BENCH / "floor.c")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return out


# -- receivers and sender ----------------------------------------------------------


class ReceiverProc:
    """One bench/receivers.py process and its line protocol."""

    def __init__(
        self,
        kind: str,
        args: argparse.Namespace,
        rcvbuf: int,
        floor_lib: Path,
        log: Path,
    ) -> None:
        env = dict(os.environ)
        env.pop("CIRCUS_WATCHDOG_NO_EXTENSIONS", None)
        if kind == "py":
            env["CIRCUS_WATCHDOG_NO_EXTENSIONS"] = "1"
        cmd = [
            PYTHON,
            str(BENCH / "receivers.py"),
            "--kind",
            kind,
            "--pids",
            str(args.pids),
            "--pid-base",
            str(PID_BASE),
            "--rcvbuf",
            str(rcvbuf),
            "--budget",
            str(args.budget),
            "--floor-lib",
            str(floor_lib),
        ]
        if args.pin:
            cmd += ["--cpu", str(args.receiver_cpu)]
        self.kind = kind
        self._log = open(log, "ab")  # closed in close()
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            cwd=ROOT,
        )
        self._sel = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)
        self._buf = b""
        self.ready = self.read(READY_TIMEOUT)
        if "ready" not in self.ready:
            raise RuntimeError(f"{kind} receiver did not start: {self.ready}")
        self.port = int(self.ready["port"])

    def read(self, timeout: float) -> dict[str, Any]:
        """The next JSON line from the receiver."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sel.select(left):
                raise TimeoutError(f"{self.kind} receiver: no answer in {timeout} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                code = self.proc.wait(5)
                self._log.flush()
                tail = Path(self._log.name).read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{self.kind} receiver exited ({code}):\n{tail}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return dict(json.loads(line))

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def ask(self, command: str, timeout: float = REPLY_TIMEOUT) -> dict[str, Any]:
        self.send(command)
        return self.read(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)
        self._sel.close()
        self._log.close()


@contextmanager
def receivers(
    kinds: Sequence[str],
    args: argparse.Namespace,
    rcvbuf: int,
    floor_lib: Path,
    workdir: Path,
) -> Iterator[dict[str, ReceiverProc]]:
    """One started receiver per kind, all stopped on exit."""
    with ExitStack() as stack:
        procs: dict[str, ReceiverProc] = {}
        for kind in kinds:
            rx = ReceiverProc(kind, args, rcvbuf, floor_lib, workdir / f"rx-{kind}.log")
            stack.callback(rx.close)
            procs[kind] = rx
        yield procs


def pinned(cpu: int | None) -> Callable[[], None] | None:
    if cpu is None:
        return None

    def pin() -> None:
        os.sched_setaffinity(0, {cpu})

    return pin


def loadgen(
    target: str,
    rate: str,
    duration: float,
    args: argparse.Namespace,
    who: Sequence[str],
) -> dict[str, Any]:
    """Run ``python -m loadgen`` once (one worker); its JSON report."""
    cmd = [
        PYTHON,
        "-m",
        "loadgen",
        "--target",
        target,
        *who,
        "--rate",
        rate,
        "--duration",
        f"{duration:g}",
        "--workers",
        "1",
        "--json",
    ]
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=duration + LOADGEN_GRACE,
        preexec_fn=pinned(args.sender_cpu if args.pin else None),
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen failed ({proc.returncode}): {proc.stderr}")
    return dict(json.loads(proc.stdout))


def synthetic(args: argparse.Namespace) -> list[str]:
    return ["--pids", str(args.pids), "--pid-base", str(PID_BASE)]


# -- 1. fixed rates ------------------------------------------------------------


def window_row(
    rx: ReceiverProc, rate: str, args: argparse.Namespace, window: float
) -> dict[str, Any]:
    """One receiver, one loadgen run at ``rate`` for ``window`` seconds."""
    snmp0, stat0 = rcvbuf_errors(), cpu_stat()
    rx.ask("start")
    sent = loadgen(f"127.0.0.1:{rx.port}", rate, window, args, synthetic(args))
    got = rx.ask("stop")
    snmp1, stat1 = rcvbuf_errors(), cpu_stat()
    span = got["last"] - got["first"]
    hb = got["heartbeats"]
    return {
        "receiver": rx.kind,
        "offered": rate,
        "window": window,
        "sent": sent["sent"],
        "sent_rate": sent["rate"],
        "sender_elapsed": sent["elapsed"],
        "sender_full": sent["full"],
        "datagrams": got["datagrams"],
        "heartbeats": hb,
        "unknown": got["unknown"],
        "malformed": got["malformed"],
        "loss": sent["sent"] - got["datagrams"],
        "socket_drops": got["drops"],
        "rcvbuf_errors": snmp1 - snmp0,
        "rxq_ovfl": got["rxq_ovfl"],
        "cpu": got["cpu"],
        "cpu_us_per_hb": round(got["cpu"] / hb * 1e6, 4) if hb else None,
        "processed_rate": round(hb / span, 1) if span > 0 else None,
        "cpu_use": cpu_use(stat0, stat1, got["cpu"]),
    }


def rates_phase(
    procs: dict[str, ReceiverProc],
    rates: Sequence[str],
    args: argparse.Namespace,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    rows = []
    kinds = list(procs)
    for i, rate in enumerate(rates):
        # Rotate the order from rate to rate, so that no receiver always runs
        # right after the same one.
        order = kinds[i % len(kinds) :] + kinds[: i % len(kinds)]
        for kind in order:
            row = window_row(procs[kind], rate, args, args.window)
            rows.append(row)
            log(
                f"rate {rate:>7} {kind:>8}: sent {row['sent']:>9,} "
                f"({row['sent_rate']:>9,.0f}/s) counted {row['datagrams']:>9,} "
                f"loss {row['loss']:>8,} drops {row['socket_drops']:>8,} "
                f"cpu {_fmt(row['cpu_us_per_hb'])} us/hb "
                f"processed {_fmt(row['processed_rate'], ',.0f')}/s"
            )
    return rows


# -- 2. backlog ---------------------------------------------------------------


def fill(port: int, count: int, pids: Sequence[int]) -> int:
    """Queue ``count`` default-format heartbeats on 127.0.0.1:port; how many sent."""
    from circus_watchdog.core import send_heartbeats

    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        tx.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        tx.connect(("127.0.0.1", port))
        cycle = list(pids) * (256 // len(pids) + 2)
        sent = pos = 0
        deadline = time.monotonic() + FILL_LIMIT
        while sent < count and time.monotonic() < deadline:
            want = min(256, count - sent)
            got = send_heartbeats(tx, None, cycle[pos : pos + want], time.time())
            sent += got
            pos = (pos + got) % len(pids)
            if got < want:
                time.sleep(0.0005)
        return sent
    finally:
        tx.close()


def backlog_phase(
    procs: dict[str, ReceiverProc],
    args: argparse.Namespace,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    pids = range(PID_BASE, PID_BASE + args.pids)
    rows = []
    kinds = list(procs)
    for rep in range(args.repeats):
        order = kinds[rep % len(kinds) :] + kinds[: rep % len(kinds)]
        for kind in order:
            rx = procs[kind]
            rx.ask("pause")
            _, drops0 = udp_socket_stats(rx.port)
            t0 = time.monotonic()
            sent = fill(rx.port, args.backlog, pids)
            fill_s = time.monotonic() - t0
            queued, drops1 = udp_socket_stats(rx.port)
            expected = sent - (drops1 - drops0)
            got = rx.ask(f"drain {expected}", timeout=expected / 20_000 + 30)
            wall = got["done"] - got["t0"]
            hb = got["heartbeats"]
            row = {
                "receiver": kind,
                "repeat": rep,
                "sent": sent,
                "fill_seconds": round(fill_s, 3),
                "fill_drops": drops1 - drops0,
                "queued_bytes": queued,
                "datagrams": got["datagrams"],
                "heartbeats": hb,
                "wall": round(wall, 6),
                "capacity": round(hb / wall, 1) if wall > 0 else None,
                "cpu": got["cpu"],
                "cpu_us_per_hb": round(got["cpu"] / hb * 1e6, 4) if hb else None,
                # The share of a CPU the receiver got while draining: below 1,
                # other tenants of the machine took the rest.
                "cpu_share": round(got["cpu"] / wall, 3) if wall > 0 else None,
            }
            rows.append(row)
            log(
                f"backlog #{rep} {kind:>8}: {hb:,} in {wall:.3f} s = "
                f"{_fmt(row['capacity'], ',.0f')}/s, cpu "
                f"{_fmt(row['cpu_us_per_hb'])} us/hb (fill drops {row['fill_drops']})"
            )
    return rows


def backlog_summary(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Median capacity and CPU per heartbeat of each receiver over the repeats."""
    out: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        mine = [r for r in rows if r["receiver"] == kind and r["capacity"]]
        if mine:
            cpu = statistics.median(r["cpu_us_per_hb"] for r in mine)
            out[kind] = {
                "capacity": statistics.median(r["capacity"] for r in mine),
                "capacity_best": max(r["capacity"] for r in mine),
                "cpu_us_per_hb": cpu,
                # Heartbeats per CPU-second: the capacity of one whole CPU,
                # whatever share of it the neighbours left.
                "cpu_capacity": round(1e6 / cpu, 1),
                "cpu_share": statistics.median(r["cpu_share"] for r in mine),
                "repeats": len(mine),
                "backlog": mine[0]["sent"],
            }
    return out


# -- 4. standalone daemon ------------------------------------------------------


def metrics(port: int) -> dict[str, float]:
    """The daemon's /metrics, summed over labels."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=2) as resp:  # loopback only
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        key = name.split("{", 1)[0].removeprefix("circus_watchdog_")
        out[key] = out.get(key, 0.0) + float(value)
    return out


def poll(predicate: Callable[[], Any], limit: float, what: str) -> Any:
    deadline = time.monotonic() + limit
    for _ in range(int(limit / 0.2) + 2):
        try:
            value = predicate()
        except OSError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    raise TimeoutError(f"{what}: not within {limit:g} s")


def standalone_phase(
    args: argparse.Namespace, workdir: Path, log: Callable[[str], None]
) -> dict[str, Any]:
    """circus-watchdog against a real circusd with ``--procs`` demo workers."""
    import psutil

    # tests/support.py, by path: bench/ has a support module of its own.
    spec = importlib.util.spec_from_file_location(
        "circus_watchdog_test_support", ROOT / "tests" / "support.py"
    )
    assert spec is not None and spec.loader is not None
    support = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = support  # dataclasses look their module up there
    spec.loader.exec_module(support)
    free_port, start_circusd = support.free_port, support.start_circusd

    udp, mport = free_udp_port(), free_port()
    n = args.procs
    sections = f"""\
[watcher:workers]
cmd = {PYTHON} -m circus_watchdog.demo_worker --address 127.0.0.1:{udp} --interval 1
numprocesses = {n}
"""
    out: dict[str, Any] = {"procs": n, "udp_port": udp, "rows": []}
    t0 = time.monotonic()
    cdir = workdir / "circusd"
    cdir.mkdir()
    circusd = start_circusd(cdir, sections)
    daemon: subprocess.Popen[bytes] | None = None
    try:
        poll(
            lambda: len(circusd.pids("workers")) == n,
            SPAWN_LIMIT,
            f"circusd running {n} workers",
        )
        out["spawn_seconds"] = round(time.monotonic() - t0, 1)
        log(f"standalone: circusd runs {n} workers ({out['spawn_seconds']} s)")
        pids_before = circusd.pids("workers")
        with open(workdir / "daemon.log", "ab") as dlog:
            daemon = subprocess.Popen(
                [
                    PYTHON,
                    "-m",
                    "circus_watchdog",
                    "--endpoint",
                    circusd.endpoint,
                    "--pubsub",
                    circusd.pubsub,
                    "--port",
                    str(udp),
                    "--metrics-port",
                    str(mport),
                    "--loop-rate",
                    "5",
                    "--watchers-regex",
                    "^workers$",
                ],
                stdout=dlog,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                preexec_fn=pinned(args.receiver_cpu if args.pin else None),
            )
        t1 = time.monotonic()
        poll(
            lambda: metrics(mport).get("monitored_pids") == n,
            SYNC_LIMIT,
            f"circus-watchdog monitoring {n} pids",
        )
        out["sync_seconds"] = round(time.monotonic() - t1, 1)
        ps = psutil.Process(daemon.pid)
        out["rcvbuf"] = daemon_rcvbuf(udp)
        for rate in args.e2e_rates:
            m0, cpu0 = metrics(mport), ps.cpu_times()
            _, drops0 = udp_socket_stats(udp)
            snmp0, stat0 = rcvbuf_errors(), cpu_stat()
            sent = loadgen(
                f"127.0.0.1:{udp}",
                rate,
                args.e2e_window,
                args,
                ["--endpoint", circusd.endpoint, "--watchers", "^workers$"],
            )
            settle(mport)
            m1, cpu1 = metrics(mport), ps.cpu_times()
            _, drops1 = udp_socket_stats(udp)
            snmp1, stat1 = rcvbuf_errors(), cpu_stat()

            def d(key: str, a: dict[str, float] = m0, b: dict[str, float] = m1) -> int:
                return int(b.get(key, 0) - a.get(key, 0))

            hb = d("heartbeats_total")
            cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
            row = {
                "offered": rate,
                "sent": sent["sent"],
                "sent_rate": sent["rate"],
                "sender_elapsed": sent["elapsed"],
                "datagrams": d("datagrams_total"),
                "heartbeats": hb,
                "unknown": d("unknown_pid_total"),
                "malformed": d("malformed_total"),
                "socket_drops": drops1 - drops0,
                "rcvbuf_errors": snmp1 - snmp0,
                "kills": d("kills_total"),
                "kill_failures": d("kill_failures_total"),
                "kills_held": d("kills_held_total"),
                "stalls": d("stalls_total"),
                "monitored_pids": m1.get("monitored_pids"),
                "processed_rate": round(hb / sent["elapsed"], 1)
                if sent["elapsed"]
                else None,
                "cpu": round(cpu, 4),
                "cpu_us_per_hb": round(cpu / hb * 1e6, 4) if hb else None,
                "cpu_use": cpu_use(stat0, stat1, cpu),
            }
            out["rows"].append(row)
            log(
                f"standalone {rate:>7}: sent {row['sent']:,} "
                f"({row['sent_rate']:,.0f}/s) heartbeats {hb:,} "
                f"drops {row['socket_drops']:,} kills {row['kills']} cpu "
                f"{_fmt(row['cpu_us_per_hb'])} us/hb"
            )
        final = metrics(mport)
        out["kills_total"] = int(final.get("kills_total", 0))
        out["kill_failures_total"] = int(final.get("kill_failures_total", 0))
        out["pids_unchanged"] = circusd.pids("workers") == pids_before
        out["info"] = daemon_info(mport)
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(10)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(5)
        if daemon is not None:
            out["daemon_exit"] = daemon.returncode
        circusd.stop()
    return out


def daemon_rcvbuf(port: int) -> int | None:
    """Bytes the kernel granted the daemon's socket: its rmem limit in ss -m."""
    try:
        proc = subprocess.run(
            ["ss", "-u", "-l", "-n", "-m", f"sport = :{port}"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"rb(\d+)", proc.stdout)
    return int(match[1]) // 2 if match else None


def daemon_info(port: int) -> str:
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=2) as resp:  # loopback only
        for line in resp.read().decode().splitlines():
            if line.startswith("circus_watchdog_info"):
                return str(line)
    return ""


def settle(mport: int) -> None:
    """Wait until the daemon's datagram count stops moving."""
    last = -1.0
    deadline = time.monotonic() + SETTLE_LIMIT
    while time.monotonic() < deadline:
        now = metrics(mport).get("datagrams_total", 0.0)
        # The workers add about one per second each: a queue being read moves
        # it by far more than that in 0.2 s.
        if last >= 0 and now - last < 1000:
            return
        last = now
        time.sleep(0.2)


# -- report -----------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def _ratio(num: float | None, den: float | None) -> str:
    return "-" if not num or not den else f"{num / den:.2f}x"


def _others(row: dict[str, Any]) -> str:
    use = row.get("cpu_use")
    return "-" if not use else f"{use['others']:.2f} CPU"


def _rate_label(rate: str) -> str:
    return rate if rate == "max" else f"{float(rate) / 1000:g}k"


def rate_rows(res: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    by: dict[str, dict[str, dict[str, Any]]] = {}
    for row in res.get("rates", []):
        by.setdefault(row["offered"], {})[row["receiver"]] = row
    return by


def targets(res: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    """(target, met?, measured) for the issue's and design.md's targets."""
    out: list[tuple[str, bool | None, str]] = []
    by = rate_rows(res)
    bl = res.get("backlog_summary", {})

    def cpu(kind: str, rows: dict[str, Any]) -> float | None:
        value = rows.get(kind, {}).get("cpu_us_per_hb")
        return None if value is None else float(value)

    # CPU per heartbeat: c vs floor and vs original, each mode.
    modes = [(f"{_rate_label(r)}/s", rows) for r, rows in by.items()]
    if bl:
        modes.append(("backlog", bl))
    for name, rows in modes:
        c, fl, orig = cpu("c", rows), cpu("floor", rows), cpu("original", rows)
        if c and fl:
            out.append(
                (
                    f"compiled CPU/heartbeat <= 1.25x floor ({name})",
                    c / fl <= 1.25,
                    f"{c / fl:.2f}x ({c:.3g} vs {fl:.3g} us)",
                )
            )
        if c and orig:
            out.append(
                (
                    f"compiled CPU/heartbeat >= 4x lower than original ({name})",
                    orig / c >= 4,
                    f"{orig / c:.2f}x lower ({c:.3g} vs {orig:.3g} us)",
                )
            )
    for key, how in (("capacity", "wall time"), ("cpu_capacity", "per CPU-second")):
        if "c" in bl and "original" in bl:
            r = bl["c"][key] / bl["original"][key]
            detail = f"{r:.2f}x ({bl['c'][key]:,.0f} vs {bl['original'][key]:,.0f}/s)"
            out.append(
                (f"backlog capacity >= 4x original ({how}; issue)", r >= 4, detail)
            )
            out.append(
                (
                    f"flood ingest >= 10x original (backlog, {how}; design)",
                    r >= 10,
                    detail,
                )
            )
        if "c" in bl and "floor" in bl:
            r = bl["c"][key] / bl["floor"][key]
            out.append(
                (
                    f"flood ingest >= 0.7x floor (backlog, {how}; design)",
                    r >= 0.7,
                    f"{r:.2f}x ({bl['c'][key]:,.0f} vs {bl['floor'][key]:,.0f}/s)",
                )
            )
    mx = by.get("max", {})
    if "c" in mx and "original" in mx:
        c, o = mx["c"]["processed_rate"], mx["original"]["processed_rate"]
        if c and o:
            bound = mx["c"]["loss"] == 0  # it read all one sender could send
            out.append(
                (
                    "flood ingest >= 10x original (design, live max flood)",
                    None if bound else c / o >= 10,
                    f"{c / o:.2f}x ({c:,.0f} vs {o:,.0f}/s)"
                    + (
                        "; untestable live: the compiled core read all that one "
                        "sender could send, see the backlog"
                        if bound
                        else ""
                    ),
                )
            )
    for rate, rows in by.items():
        if rate != "max" and float(rate) == 200_000 and "c" in rows:
            c200 = rows["c"]
            out.append(
                (
                    f"no loss at 200k/s for {c200['window']:g} s (compiled, issue)",
                    c200["loss"] == 0
                    and c200["socket_drops"] == 0
                    and c200["rcvbuf_errors"] == 0,
                    f"sent {c200['sent']:,}, counted {c200['datagrams']:,}, socket "
                    f"drops {c200['socket_drops']}, RcvbufErrors "
                    f"+{c200['rcvbuf_errors']}",
                )
            )
    half = res.get("half_ceiling")
    if half:
        hrows = {row["receiver"]: row for row in half["rows"]}
        r, fl = hrows.get("c"), hrows.get("floor")
        if r is not None:
            half_ok: bool | None = r["loss"] == 0 and r["socket_drops"] == 0
            short = r["sent_rate"] < 0.95 * half["rate"]
            if half_ok and short:
                half_ok = None  # no loss, but not at the rate asked
            beside = (
                ""
                if fl is None
                else f"; the floor beside it: sent {fl['sent_rate']:,.0f}/s, "
                f"loss {fl['loss']:,}"
            )
            out.append(
                (
                    "no loss at 50% of the ceiling (design)",
                    half_ok,
                    f"asked {half['rate']:,.0f}/s, the sender reached "
                    f"{r['sent_rate']:,.0f}/s"
                    + (" (one sender's limit here)" if short else "")
                    + f"; loss {r['loss']:,}, drops {r['socket_drops']:,}{beside}",
                )
            )
    sa: dict[str, Any] = res.get("standalone") or {}
    for srow in sa.get("rows", []):
        if srow["offered"] != "max" and float(srow["offered"]) == 200_000:
            out.append(
                (
                    "no loss at 200k/s, standalone daemon, its default rcvbuf "
                    f"({_fmt(sa.get('rcvbuf'), ',')} bytes granted)",
                    srow["socket_drops"] == 0 and srow["rcvbuf_errors"] == 0,
                    f"sent {srow['sent']:,}, socket drops {srow['socket_drops']:,}, "
                    f"RcvbufErrors +{srow['rcvbuf_errors']:,}",
                )
            )
    if sa.get("rows"):
        out.append(
            (
                "standalone daemon: no kill under flood",
                sa.get("kills_total") == 0 and sa.get("pids_unchanged", False),
                f"kills {sa.get('kills_total')}, workers unchanged "
                f"{sa.get('pids_unchanged')}",
            )
        )
    return out


def markdown(res: dict[str, Any]) -> str:
    """The tables of docs/benchmarks.md, from a results file."""
    lines: list[str] = []
    by = rate_rows(res)
    kinds = [k for k in KINDS if any(k in rows for rows in by.values())]
    if by:
        lines += [
            f"Fixed offered rates, {res['args']['window']:g} s per receiver "
            "(loss = sent - counted; drops = the socket's kernel drop count; "
            "SO_RXQ_OVFL as the core read it; CPU = receiver user+sys; others' "
            "load = CPU time of other tenants of the machine meanwhile):",
            "",
            "| offered | receiver | sent/s | processed hb/s | loss | drops "
            "| RcvbufErrors | SO_RXQ_OVFL | CPU us/hb | CPU vs original "
            "| CPU vs floor | others' load |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for rate, rows in by.items():
            orig = rows.get("original", {}).get("cpu_us_per_hb")
            floor = rows.get("floor", {}).get("cpu_us_per_hb")
            for kind in kinds:
                r = rows.get(kind)
                if r is None:
                    continue
                mine = r["cpu_us_per_hb"]
                lines.append(
                    f"| {_rate_label(rate)} | {kind} | {r['sent_rate']:,.0f} | "
                    f"{_fmt(r['processed_rate'], ',.0f')} | {r['loss']:,} | "
                    f"{r['socket_drops']:,} | {r['rcvbuf_errors']:,} | "
                    f"{'-' if r['rxq_ovfl'] is None else format(r['rxq_ovfl'], ',')}"
                    f" | {_fmt(mine)} | "
                    f"{'1' if kind == 'original' else _ratio(orig, mine) + ' lower'}"
                    f" | {_ratio(mine, floor)} | {_others(r)} |"
                )
        lines.append("")
    bl = res.get("backlog_summary", {})
    if bl:
        orig, floor = bl.get("original", {}), bl.get("floor", {})
        any_row = next(iter(bl.values()))
        lines += [
            f"Backlog: {any_row['backlog']:,} heartbeats queued, then drained by the "
            f"receiver alone (median of {any_row['repeats']}; capacity = heartbeats "
            "/ wall time; hb per CPU-second = 1 / CPU per heartbeat; CPU share = "
            "the share of its CPU the receiver got, the rest went to neighbours):",
            "",
            "| receiver | capacity hb/s | vs original | vs floor | CPU us/hb "
            "| hb per CPU-second | vs original | vs floor | CPU share |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for kind in KINDS:
            r = bl.get(kind)
            if r is None:
                continue
            lines.append(
                f"| {kind} | {r['capacity']:,.0f} | "
                f"{_ratio(r['capacity'], orig.get('capacity'))} | "
                f"{_ratio(r['capacity'], floor.get('capacity'))} | "
                f"{_fmt(r['cpu_us_per_hb'])} | {r['cpu_capacity']:,.0f} | "
                f"{_ratio(r['cpu_capacity'], orig.get('cpu_capacity'))} | "
                f"{_ratio(r['cpu_capacity'], floor.get('cpu_capacity'))} | "
                f"{r['cpu_share']:.2f} |"
            )
        lines.append("")
    half = res.get("half_ceiling")
    if half:
        lines += [
            f"Half the ceiling: {half['rate']:,.0f} hb/s asked (50% of the floor's "
            "backlog heartbeats per CPU-second):",
            "",
            "| receiver | sent/s | processed hb/s | loss | drops | CPU us/hb |",
            "|---|--:|--:|--:|--:|--:|",
        ]
        for r in half["rows"]:
            lines.append(
                f"| {r['receiver']} | {r['sent_rate']:,.0f} | "
                f"{_fmt(r['processed_rate'], ',.0f')} | {r['loss']:,} | "
                f"{r['socket_drops']:,} | {_fmt(r['cpu_us_per_hb'])} |"
            )
        lines.append("")
    sa = res.get("standalone")
    if sa and sa.get("rows"):
        lines += [
            f"Standalone daemon against circusd with {sa['procs']} workers "
            f"(rcvbuf granted {_fmt(sa.get('rcvbuf'), ',')} bytes), "
            f"{res['args']['e2e_window']:g} s per rate:",
            "",
            "| offered | sent/s | processed hb/s | unknown | drops | kills "
            "| CPU us/hb |",
            "|---|--:|--:|--:|--:|--:|--:|",
        ]
        for r in sa["rows"]:
            lines.append(
                f"| {_rate_label(r['offered'])} | {r['sent_rate']:,.0f} | "
                f"{_fmt(r['processed_rate'], ',.0f')} | {r['unknown']:,} | "
                f"{r['socket_drops']:,} | {r['kills']} | {_fmt(r['cpu_us_per_hb'])} |"
            )
        lines.append("")
    tg = targets(res)
    if tg:
        lines += ["Targets:", ""]
        for name, ok, detail in tg:
            state = (
                "not testable here" if ok is None else ("met" if ok else "**missed**")
            )
            lines.append(f"- {state}: {name}: {detail}")
        lines.append("")
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    """Processed vs offered rate, CPU per heartbeat and backlog capacity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = rate_rows(res)
    bl = res.get("backlog_summary", {})
    fig, (left, mid, right) = plt.subplots(
        1, 3, figsize=(16, 5.2), gridspec_kw={"width_ratios": [1.1, 1.3, 0.7]}
    )
    # Left: processed heartbeats/s against what the sender really sent.
    top = 1.0
    for kind in KINDS:
        pts = sorted(
            (rows[kind]["sent_rate"], rows[kind]["processed_rate"] or 0.0)
            for rows in by.values()
            if kind in rows
        )
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        top = max(top, *xs, *ys)
        left.plot(
            [x / 1e3 for x in xs],
            [y / 1e3 for y in ys],
            "o-",
            color=COLORS[kind],
            label=LABELS[kind],
        )
    left.plot([0, top / 1e3], [0, top / 1e3], ":", color="black", label="= offered")
    left.set_xlabel("offered (as the sender achieved it), k heartbeats/s")
    left.set_ylabel("processed, k heartbeats/s")
    left.set_title("Live flood (rightmost points: --rate max)", fontsize=10)
    left.grid(alpha=0.3)
    left.legend(fontsize=8, loc="upper left")
    # Middle: CPU us per heartbeat, grouped by mode.
    groups = [(_rate_label(r), rows) for r, rows in by.items()]
    if bl:
        groups.append(("backlog", bl))
    kinds = [k for k in KINDS if any(k in rows for _, rows in groups)]
    width = 0.8 / max(len(kinds), 1)
    peak = 1.0
    for j, kind in enumerate(kinds):
        at: list[float] = []
        cpu: list[float] = []
        for i, (_, rows) in enumerate(groups):
            value = rows.get(kind, {}).get("cpu_us_per_hb")
            if value:
                at.append(i + (j - (len(kinds) - 1) / 2) * width)
                cpu.append(value)
                peak = max(peak, value)
        bars = mid.bar(at, cpu, width, color=COLORS[kind], label=LABELS[kind])
        mid.bar_label(bars, fmt="%.2g", fontsize=7, padding=1)
    mid.set_xticks(range(len(groups)), [g for g, _ in groups])
    mid.set_ylim(0, peak * 1.3)
    mid.set_xlabel("offered heartbeats/s, or backlog drain")
    mid.set_ylabel("receiver CPU per heartbeat, us (user + sys)")
    mid.set_title("CPU per heartbeat", fontsize=10)
    mid.grid(axis="y", alpha=0.3)
    mid.legend(fontsize=8, loc="upper center", ncol=2)
    # Right: backlog drain capacity, by wall time and per CPU-second.
    if bl:
        names = [k for k in KINDS if k in bl]
        slots = range(len(names))
        walls = [bl[k]["capacity"] / 1e3 for k in names]
        cpus = [bl[k]["cpu_capacity"] / 1e3 for k in names]
        colors = [COLORS[k] for k in names]
        bars = right.bar([x - 0.2 for x in slots], walls, 0.4, color=colors)
        right.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
        bars = right.bar(
            [x + 0.2 for x in slots],
            cpus,
            0.4,
            color=colors,
            alpha=0.45,
            hatch="//",
            edgecolor="black",
            linewidth=0.5,
        )
        right.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
        right.set_xticks(list(slots), names)
        right.set_ylim(0, max(*walls, *cpus) * 1.15)
        right.set_ylabel("k heartbeats/s")
        right.set_title(
            f"Backlog drain, {next(iter(bl.values()))['backlog']:,} queued\n"
            "solid: by wall time; hatched: per CPU-second",
            fontsize=10,
        )
        right.grid(axis="y", alpha=0.3)
    else:
        right.set_axis_off()
    m = res.get("machine", {})
    title = (
        f"circus-watchdog end to end ({res.get('date', '')[:10]}): "
        f"{m.get('cpus')} CPUs ({m.get('cpu', '')}), Linux {m.get('kernel', '')}, "
        f"Python {m.get('python', '')}"
    )
    if res.get("args", {}).get("pin"):
        title += "; sender and receiver pinned to different CPUs"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- main -------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="End-to-end benchmark of the heartbeat receivers, side by side."
    )
    p.add_argument(
        "--rates",
        default="50000,100000,200000,max",
        help="offered rates, comma-separated heartbeats/s or 'max' "
        "(default: 50000,100000,200000,max)",
    )
    p.add_argument(
        "--window", type=float, default=10.0, help="seconds per rate (default: 10)"
    )
    p.add_argument(
        "--receivers",
        default=",".join(KINDS),
        help=f"which receivers, comma-separated (default: {','.join(KINDS)})",
    )
    p.add_argument(
        "--pids", type=int, default=1000, help="known pids, all sent (default: 1000)"
    )
    p.add_argument(
        "--rcvbuf",
        type=int,
        default=8 << 20,
        help="SO_RCVBUF of every receiver for the rates, bytes (default: 8 MiB, "
        "the engine's default)",
    )
    p.add_argument(
        "--budget",
        type=int,
        default=4096,
        help="datagrams per wake-up for c, py and floor (default: 4096, the "
        "engine's default)",
    )
    p.add_argument(
        "--backlog",
        type=int,
        default=300_000,
        help="heartbeats queued per backlog drain, 0 to skip (default: 300000)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="backlog drains per receiver (default: 3)",
    )
    p.add_argument(
        "--no-half-ceiling",
        dest="half_ceiling",
        action="store_false",
        help="skip the run at half the floor's backlog capacity",
    )
    p.add_argument(
        "--procs",
        type=int,
        default=300,
        help="demo workers under circusd for the standalone run, 0 to skip "
        "(default: 300)",
    )
    p.add_argument(
        "--e2e-rates",
        default="200000,max",
        help="offered rates for the standalone run (default: 200000,max)",
    )
    p.add_argument(
        "--e2e-window",
        type=float,
        default=10.0,
        help="seconds per standalone rate (default: 10)",
    )
    p.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="do not pin the sender and the receiver to different CPUs",
    )
    p.add_argument("--sender-cpu", type=int, default=0, help="default: 0")
    p.add_argument("--receiver-cpu", type=int, default=1, help="default: 1")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a 30-40 s smoke run: rates 50000,200000,max for 2 s, one 100000 "
        "backlog, no half-ceiling run, 30 workers for 2 s at 200000",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results JSON (default: bench/results/e2e-<date>.json)",
    )
    p.add_argument(
        "--png",
        type=Path,
        default=ROOT / "docs" / "benchmark-e2e.png",
        help="plot to write (default: docs/benchmark-e2e.png)",
    )
    p.add_argument(
        "--plot-only",
        type=Path,
        metavar="RESULTS_JSON",
        help="only redraw the plot and print the tables of a results file",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.rates, args.window = "50000,200000,max", 2.0
        args.backlog, args.repeats = 100_000, 1
        args.procs, args.e2e_rates, args.e2e_window = 30, "200000", 2.0
        args.half_ceiling = False
    args.rate_list = [r.strip() for r in args.rates.split(",") if r.strip()]
    args.e2e_rates = [r.strip() for r in args.e2e_rates.split(",") if r.strip()]
    args.kinds = [k.strip() for k in args.receivers.split(",") if k.strip()]
    bad = [k for k in args.kinds if k not in KINDS]
    if bad:
        p.error(f"--receivers: unknown {bad}; choose from {KINDS}")
    if args.pin and (os.cpu_count() or 1) < 2:
        args.pin = False
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot_only:
        saved = json.loads(args.plot_only.read_text())
        plot(saved, args.png)
        print(markdown(saved))
        print(f"plot: {args.png}")
        return 0
    started = time.monotonic()
    date = datetime.datetime.now().strftime("%Y-%m-%d")
    out = args.out or BENCH / "results" / f"e2e-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.pin:
        os.sched_setaffinity(0, {args.sender_cpu})  # the backlog filler sends

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {msg}", flush=True)

    res: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/e2e.py", *(argv or sys.argv[1:])]),
        "machine": machine(),
        "args": {
            "rates": args.rate_list,
            "window": args.window,
            "receivers": args.kinds,
            "pids": args.pids,
            "rcvbuf": args.rcvbuf,
            "budget": args.budget,
            "backlog": args.backlog,
            "repeats": args.repeats,
            "procs": args.procs,
            "e2e_rates": args.e2e_rates,
            "e2e_window": args.e2e_window,
            "pin": {"sender": args.sender_cpu, "receiver": args.receiver_cpu}
            if args.pin
            else None,
        },
    }
    m = res["machine"]
    log(
        f"{m['cpus']} CPUs ({m['cpu']}), Linux {m['kernel']}, rmem_max "
        f"{m['rmem_max']:,}, compiled core {m['compiled']}"
    )
    with tempfile.TemporaryDirectory(prefix="circus-watchdog-e2e-") as tmp:
        workdir = Path(tmp)
        floor_lib = build_floor(workdir)
        try:
            if args.rate_list:
                with receivers(args.kinds, args, args.rcvbuf, floor_lib, workdir) as rx:
                    res["receivers"] = {k: p.ready for k, p in rx.items()}
                    for k, p in rx.items():
                        log(f"receiver {k}: {p.ready}")
                    res["rates"] = rates_phase(rx, args.rate_list, args, log)
            if args.backlog:
                # Room for the whole backlog: about 830 bytes of kernel memory
                # per queued 20-byte datagram, counted against twice SO_RCVBUF.
                size = max(64 << 20, args.backlog * 1024)
                with receivers(args.kinds, args, size, floor_lib, workdir) as rx:
                    res["backlog_rcvbuf"] = {
                        k: p.ready["rcvbuf"] for k, p in rx.items()
                    }
                    res["backlog"] = backlog_phase(rx, args, log)
                res["backlog_summary"] = backlog_summary(res["backlog"])
            # The ceiling: what the floor drains with a whole CPU to itself.
            floor_bl = res.get("backlog_summary", {}).get("floor", {})
            ceiling = floor_bl.get("cpu_capacity")
            if args.half_ceiling and ceiling and "c" in args.kinds:
                rate = ceiling / 2
                half = ["c", "floor"]
                with receivers(half, args, args.rcvbuf, floor_lib, workdir) as rx:
                    rows = rates_phase(rx, [f"{rate:.0f}"], args, log)
                res["half_ceiling"] = {"rate": rate, "rows": rows}
            if args.procs:
                if args.pin:
                    # circusd and its workers float over every CPU.
                    os.sched_setaffinity(0, range(os.cpu_count() or 1))
                res["standalone"] = standalone_phase(args, workdir, log)
        finally:
            res["machine"]["loadavg_end"] = os.getloadavg()
            res["runtime_seconds"] = round(time.monotonic() - started, 1)
            out.write_text(json.dumps(res, indent=1) + "\n")
            log(f"results: {out}")
    plot(res, args.png)
    print(markdown(res))
    log(f"plot: {args.png}; done in {res['runtime_seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
