"""loadgen against a real UDP receiver on loopback (never any other address)."""

from __future__ import annotations

import importlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from circus_watchdog.core import HeartbeatTable, parse_heartbeat
from circus_watchdog.loadgen import flood
from circus_watchdog.loadgen.cli import main
from circus_watchdog.loadgen.options import resolve_target

RCVBUF = 8 * 1024 * 1024  # bytes asked; the kernel caps it at rmem_max
RECV_LIMIT = 120.0  # seconds a receiver thread may run, whatever happens


class Receiver:
    """A UDP socket on loopback read continuously by a thread, keeping payloads."""

    def __init__(self, family: int = socket.AF_INET) -> None:
        host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            self.sock.bind((host, 0))
        except BaseException:
            self.sock.close()
            raise
        self.sock.settimeout(0.05)
        self.port: int = self.sock.getsockname()[1]
        self.target = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        self.payloads: list[bytes] = []
        self.last_arrival = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        end = time.monotonic() + RECV_LIMIT
        recv, append = self.sock.recv, self.payloads.append
        while not self._stop.is_set() and time.monotonic() < end:
            try:
                append(recv(4096))
            except TimeoutError:
                continue
            self.last_arrival = time.monotonic()

    @property
    def count(self) -> int:
        """Datagrams received so far."""
        return len(self.payloads)

    def settle(self, expected: int | None = None, quiet: float = 0.3) -> int:
        """Wait (10 s at most) for ``expected`` datagrams, or ``quiet`` s of silence."""
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            if expected is not None and self.count >= expected:
                break
            if time.monotonic() - self.last_arrival > quiet:
                break
            time.sleep(0.02)
        return self.count

    def drops(self) -> int | None:
        """Datagrams the kernel dropped on this socket (Linux /proc), else None."""
        name = (
            "/proc/net/udp6"
            if self.sock.family == socket.AF_INET6
            else ("/proc/net/udp")
        )
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            return None
        inode = str(os.fstat(self.sock.fileno()).st_ino)
        for line in lines:
            fields = line.split()
            if fields[9] == inode:
                return int(fields[-1])
        return None

    def close(self) -> None:
        """Stop the thread and close the socket."""
        self._stop.set()
        self._thread.join(timeout=5.0)
        self.sock.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rx = Receiver()
    try:
        yield rx
    finally:
        rx.close()


def run_json(
    capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, dict[str, Any]]:
    """Run loadgen in-process with --json; exit status and parsed report."""
    code = main([*argv, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out)


def classify(payloads: list[bytes], known: set[int]) -> dict[str, int]:
    """Count valid, unknown-pid and malformed datagrams as the watchdog would."""
    kinds = {"valid": 0, "unknown": 0, "malformed": 0}
    for data in payloads:
        pid = parse_heartbeat(data)
        kind = "malformed" if pid is None else "valid" if pid in known else "unknown"
        kinds[kind] += 1
    return kinds


def test_malformed_corpus_is_malformed(
    parse_heartbeat: Callable[[bytes], int | None],
) -> None:
    for data in flood.MALFORMED:
        assert parse_heartbeat(data) is None, data


def test_count_is_exact(receiver: Receiver, capsys: pytest.CaptureFixture[str]) -> None:
    code, report = run_json(
        capsys, "--target", receiver.target, "--count", "20000", "--rate", "20000"
    )
    assert code == 0
    assert report["sent"] == 20000
    assert receiver.settle(20000) == 20000
    assert receiver.drops() in (0, None)
    assert classify(receiver.payloads, set(range(1000, 2000)))["valid"] == 20000


def test_workers_split_count_exactly(
    receiver: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report = run_json(
        capsys,
        "--target", receiver.target,
        "--workers", "2",
        "--count", "20001",
        "--rate", "20000",
    )  # fmt: skip
    assert code == 0
    assert [w["sent"] for w in report["workers"]] == [10001, 10000]
    assert report["sent"] == 20001
    assert receiver.settle(20001) == 20001
    assert receiver.drops() in (0, None)


def test_worker_that_cannot_open_its_socket_fails_the_start() -> None:
    # An IPv6 address on an IPv4 socket: connect() fails in every worker, the
    # start barrier breaks, and the run ends at once with the worker's error.
    from circus_watchdog.loadgen.options import RunError
    from circus_watchdog.loadgen.report import Progress
    from circus_watchdog.loadgen.workers import run_processes

    plan = flood.Plan(
        index=0,
        family=socket.AF_INET,
        sockaddr=("::1", 9),
        pids=(1000,),
        rate=None,
        count=10,
        duration=5.0,
        malformed=0.0,
        unknown=0.0,
        sndbuf=65536,
        seed=0,
    )
    plans = [plan, flood.Plan(**{**plan.__dict__, "index": 1})]
    start = time.monotonic()
    with pytest.raises(RunError, match="cannot open a socket to --target: worker"):
        run_processes(plans, Progress(io.StringIO(), False, 10, 5.0))
    assert time.monotonic() - start < flood.STARTUP_TIMEOUT


def test_rate_is_honoured(
    receiver: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    start = time.monotonic()
    code, report = run_json(
        capsys, "--target", receiver.target, "--rate", "5000", "--duration", "3"
    )
    wall = time.monotonic() - start
    assert code == 0
    received = receiver.settle()
    assert received == report["sent"]
    assert 4500 <= received / report["elapsed"] <= 5500
    assert 4500 <= received / wall <= 5500
    assert 4500 <= report["rate"] <= 5500


def test_stops_at_duration(capsys: pytest.CaptureFixture[str]) -> None:
    # A bound socket nobody reads: the kernel drops the overflow quietly.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{sink.getsockname()[1]}"
        start = time.monotonic()
        code, report = run_json(
            capsys, "--target", target, "--rate", "max", "--duration", "1"
        )
        wall = time.monotonic() - start
    assert code == 0
    assert report["sent"] > 0
    # Stops at --duration, not at some other bound (generous: a shared host).
    assert 1.0 <= report["elapsed"] < 2.0
    assert wall < 3.0


def test_mix_shares(receiver: Receiver, capsys: pytest.CaptureFixture[str]) -> None:
    code, report = run_json(
        capsys,
        "--target", receiver.target,
        "--pids", "50",
        "--pid-base", "4000",
        "--mix", "malformed=0.2,unknown=0.3",
        "--count", "20000",
        "--rate", "20000",
    )  # fmt: skip
    assert code == 0
    assert (report["malformed"], report["unknown"]) == (4000, 6000)
    assert receiver.settle(20000) == 20000
    kinds = classify(receiver.payloads, set(range(4000, 4050)))
    assert abs(kinds["malformed"] / 20000 - 0.2) < 0.01
    assert abs(kinds["unknown"] / 20000 - 0.3) < 0.01
    assert kinds["valid"] == 20000 - kinds["malformed"] - kinds["unknown"]
    assert any(len(p) > 1024 for p in receiver.payloads)  # oversized ones too


def test_json_report(receiver: Receiver, capsys: pytest.CaptureFixture[str]) -> None:
    code, report = run_json(capsys, "--target", receiver.target, "--count", "100")
    assert code == 0
    assert {"sent", "elapsed", "rate", "workers", "mix", "target"} <= set(report)
    assert report["target"] == receiver.target
    assert report["mix"] == {"malformed": 0.0, "unknown": 0.0}
    [worker] = report["workers"]
    assert {"sent", "elapsed", "rate", "errors"} <= set(worker)
    assert worker["sent"] == report["sent"] == 100
    assert receiver.settle(100) == 100


def test_text_report_and_progress_bar(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["--target", receiver.target, "--rate", "2000", "--duration", "1"]) == 0
    text = out.getvalue()
    redraws = text.count("\r")
    assert 3 <= redraws <= 10 * 1 + 3  # at most 10 updates a second, plus erase
    report = text.rpartition("\r")[2]
    assert "total" in report and "rate/s" in report
    assert receiver.settle() > 0


def test_no_progress_bar_off_a_terminal(
    receiver: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(["--target", receiver.target, "--rate", "2000", "--duration", "0.5"]) == 0
    )
    out = capsys.readouterr().out
    assert "\r" not in out and "total" in out


def test_ipv6_target(capsys: pytest.CaptureFixture[str]) -> None:
    rx = Receiver(socket.AF_INET6)  # ::1 is on every Linux loopback: no skip
    try:
        code, report = run_json(capsys, "--target", rx.target, "--count", "500")
        assert code == 0 and report["sent"] == 500
        assert rx.settle(500) == 500
    finally:
        rx.close()


@pytest.fixture
def no_sockets(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Fail any socket creation or worker spawn; record the attempts."""
    attempts: list[tuple[Any, ...]] = []

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        attempts.append(args)
        raise AssertionError("loadgen opened a socket or a worker")

    monkeypatch.setattr(socket, "socket", forbidden)
    monkeypatch.setattr(flood, "open_socket", forbidden)
    monkeypatch.setattr("multiprocessing.get_context", forbidden)
    return attempts


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("target", ["192.0.2.1:1664", "[2001:db8::1]:1664"])
def test_refuses_non_loopback_target(
    target: str,
    workers: str,
    no_sockets: list[tuple[Any, ...]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["--target", target, "--count", "10", "--workers", workers])
    err = capsys.readouterr().err
    assert code == 2
    assert "--target" in err and "loopback" in err and "--allow-remote" in err
    assert no_sockets == []


def test_allow_remote_lifts_the_check_only() -> None:
    # Resolution only: nothing is sent anywhere.
    family, sockaddr, shown = resolve_target("192.0.2.1:1664", allow_remote=True)
    assert (family, sockaddr, shown) == (
        socket.AF_INET,
        ("192.0.2.1", 1664),
        "192.0.2.1:1664",
    )


@pytest.mark.parametrize(
    "target",
    ["nohost", "127.0.0.1", "127.0.0.1:99999", "127.0.0.1:0", "127.0.0.1:x",
     "[::1", "[::1]", "::1:1664", ":1664"],
)  # fmt: skip
def test_bad_target(
    target: str, no_sockets: list[tuple[Any, ...]], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["--target", target, "--count", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "--target: expected HOST:PORT" in err
    assert f"got {target!r}" in err
    assert no_sockets == []


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--rate", "0"], "--rate"),
        (["--rate", "fast"], "--rate"),
        (["--count", "0"], "--count"),
        (["--duration", "-1"], "--duration"),
        (["--workers", "0"], "--workers"),
        (["--workers", "1000"], "--workers"),
        (["--mix", "malformed=2"], "--mix"),
        (["--mix", "malformed=0.6,unknown=0.6"], "--mix"),
        (["--mix", "bogus=0.1"], "--mix"),
        (["--pids", "10", "--pid-base", str(2**31 - 5)], "--pid-base"),
        (["--watchers", "web"], "--watchers"),
        (["--pids", "3", "--endpoint", "tcp://127.0.0.1:5555"], "--endpoint"),
    ],
)
def test_bad_options(
    argv: list[str],
    names: str,
    no_sockets: list[tuple[Any, ...]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(argv) == 2
    assert names in capsys.readouterr().err
    assert no_sockets == []


def test_help_gives_units(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for unit in ("datagrams/s", "seconds", "datagrams", "processes", "bytes"):
        assert unit in out


@pytest.mark.parametrize("how", ["python -m", "script"])
def test_installed_command(receiver: Receiver, tmp_path: Path, how: str) -> None:
    """``python -m circus_watchdog.loadgen`` and the ``circus-watchdog-loadgen``
    script, run away from the repository: the installed package."""
    if how == "script":
        cmd = [str(Path(sys.executable).with_name("circus-watchdog-loadgen"))]
    else:
        cmd = [sys.executable, "-m", "circus_watchdog.loadgen"]
    proc = subprocess.run(
        [*cmd, "--target", receiver.target,
         "--count", "1000", "--rate", "10000", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stdout
    report = json.loads(proc.stdout)
    assert report["sent"] == 1000
    assert receiver.settle(1000) == 1000


def test_endpoint_reads_pids_from_circusd(
    circusd_factory: Callable[..., Any],
    receiver: Receiver,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from support import SLEEPER

    circusd = circusd_factory(
        f"[watcher:app]\ncmd = {SLEEPER}\nnumprocesses = 3\n\n"
        f"[watcher:other]\ncmd = {SLEEPER}\nnumprocesses = 1\n"
    )
    circusd.wait_for(lambda: len(circusd.pids("app")) == 3, 10)
    other = circusd.wait_for(lambda: circusd.pids("other"), 10)
    app = circusd.pids("app")
    code, report = run_json(
        capsys,
        "--target", receiver.target,
        "--endpoint", circusd.endpoint,
        "--watchers", "app",
        "--count", "300",
        "--rate", "3000",
    )  # fmt: skip
    assert code == 0 and report["sent"] == 300
    assert receiver.settle(300) == 300
    seen = {parse_heartbeat(p) for p in receiver.payloads}
    assert seen == set(app)
    assert not seen & set(other)

    code = main(["--target", receiver.target, "--endpoint", circusd.endpoint,
                 "--watchers", "nomatch", "--count", "1"])  # fmt: skip
    assert code == 1
    assert "no pid" in capsys.readouterr().err


def test_endpoint_without_circusd(
    receiver: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    from support import free_port

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    code = main(["--target", receiver.target, "--endpoint", endpoint,
                 "--endpoint-timeout", "0.3", "--count", "1"])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert endpoint in err and "list" in err
    assert receiver.settle() == 0


# -- the sender twins (sendmmsg compiled, a send loop in pure Python) ---------


@pytest.fixture(
    params=[pytest.param("c", marks=pytest.mark.c_extension), "py"],
    ids=lambda tag: f"send_{tag}",
)
def sender(request: pytest.FixtureRequest) -> ModuleType:
    """Each twin of loadgen's sender in turn."""
    return importlib.import_module(f"circus_watchdog.loadgen._send_{request.param}")


def test_send_heartbeats(sender: ModuleType) -> None:
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx,
    ):
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        rx.bind(("127.0.0.1", 0))
        addr = rx.getsockname()
        assert sender.send_heartbeats(tx, addr, [1, 22, 2**31 - 1], 1764310000.5) == 3
        rx.settimeout(2)
        got = [rx.recv(2048) for _ in range(3)]
        assert got == [
            b"1;1764310000.500",
            b"22;1764310000.500",
            b"2147483647;1764310000.500",
        ]
        assert sender.send_datagrams(tx, addr, [b"a", b"", bytearray(b"ccc")]) == 3
        assert [rx.recv(2048) for _ in range(3)] == [b"a", b"", b"ccc"]
        rx.settimeout(None)  # drain wants no timeout: the pure core would wait
        tx.connect(addr)
        assert sender.send_heartbeats(tx, None, list(range(1, 201))) == 200
        table = HeartbeatTable(3.0, 0.1)
        table.add(200, "w", 0.0)
        assert table.drain(rx, 1.0, 1000) == (200, 1, 199, 0, 0)


def test_send_ipv6_loopback(sender: ModuleType) -> None:
    # ::1 is part of every Linux loopback (and CI's): no skip, a failure is real.
    rx = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    rx.bind(("::1", 0))
    with rx, socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as tx:
        port = rx.getsockname()[1]
        assert sender.send_heartbeats(tx, ("::1", port), [42]) == 1
        rx.settimeout(2)
        assert rx.recv(100) == b"42;0.000"


def _chosen_sender(**env: str) -> str:
    environ = {
        k: v for k, v in os.environ.items() if k != "CIRCUS_WATCHDOG_NO_EXTENSIONS"
    }
    code = (
        "from circus_watchdog.loadgen import _send; "
        "print(_send.compiled, _send.send_heartbeats.__module__)"
    )
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        env={**environ, **env},
        timeout=60,
        check=True,
    )
    return out.stdout.strip()


@pytest.mark.c_extension
def test_compiled_sender_preferred_by_default() -> None:
    assert _chosen_sender() == "True circus_watchdog.loadgen._send_c"


def test_env_var_forces_pure_sender() -> None:
    assert _chosen_sender(CIRCUS_WATCHDOG_NO_EXTENSIONS="1") == (
        "False circus_watchdog.loadgen._send_py"
    )
