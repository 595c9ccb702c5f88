"""The heartbeat sender, against a real UDP receiver on loopback."""

from __future__ import annotations

import asyncio
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from circus_watchdog import client
from circus_watchdog.client import (
    ADDRESS_ENV,
    HeartbeatThread,
    format_heartbeat,
    get_address,
    heartbeat_task,
    main,
    parse_address,
    send_heartbeat,
    start_heartbeat_task,
)
from circus_watchdog.core import parse_heartbeat as core_parse

DOC = Path(__file__).resolve().parent.parent / "docs" / "clients.md"
MAX_DATAGRAMS = 10_000  # no receive loop runs longer than this many datagrams


@pytest.fixture(autouse=True)
def _no_address_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ADDRESS_ENV, raising=False)


def _receiver(family: int, host: str) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind((host, 0))
    except OSError:
        sock.close()
        raise
    return sock


@pytest.fixture
def receiver() -> Iterator[socket.socket]:
    """A UDP socket bound to a free port on 127.0.0.1."""
    sock = _receiver(socket.AF_INET, "127.0.0.1")
    yield sock
    sock.close()


def port_of(sock: socket.socket) -> int:
    return sock.getsockname()[1]  # type: ignore[no-any-return]


def collect(
    sock: socket.socket, window: float, limit: int = MAX_DATAGRAMS
) -> list[bytes]:
    """Datagrams that arrive within ``window`` seconds (stops early at ``limit``)."""
    got: list[bytes] = []
    deadline = time.monotonic() + window
    while len(got) < limit:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            got.append(sock.recv(2048))
        except TimeoutError:
            break
    return got


def pids(datagrams: list[bytes]) -> set[int | None]:
    return {core_parse(d) for d in datagrams}


def open_fds() -> int:
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd")
    return len(os.listdir("/proc/self/fd"))


# -- format ---------------------------------------------------------------


def test_format_parses_with_every_core(parse_heartbeat: Callable[[bytes], Any]) -> None:
    assert parse_heartbeat(format_heartbeat()) == os.getpid()
    for pid in (1, 12345, 2**31 - 1):
        assert parse_heartbeat(format_heartbeat(pid)) == pid


def test_format_is_the_original_format() -> None:
    assert format_heartbeat(12345, 1764310000.123) == b"12345;1764310000.123"
    assert format_heartbeat(42, 1.5) == b"42;1.500"
    assert re.fullmatch(rb"\d+;\d+\.\d{3}", format_heartbeat())
    now = float(format_heartbeat().split(b";")[1])
    assert abs(now - time.time()) < 60


@pytest.mark.parametrize("pid", [0, -1, 2**31])
def test_format_rejects_pids_no_process_has(pid: int) -> None:
    with pytest.raises(ValueError, match="pid"):
        format_heartbeat(pid)


# -- addresses ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:1664", ("127.0.0.1", 1664)),
        ("localhost:9", ("localhost", 9)),
        ("[::1]:1664", ("::1", 1664)),
        ("[fe80::1%lo]:65535", ("fe80::1%lo", 65535)),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "127.0.0.1",
        "127.0.0.1:",
        ":1664",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:-1",
        "127.0.0.1:16x",
        "::1:1664",
        "[::1]",
        "[]:1664",
        " 127.0.0.1:1664",
        "127.0.0.1:\uff11\uff16\uff16\uff14",  # fullwidth digits are not a port
    ],
)
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="^address: "):
        parse_address(text)


def test_address_default_env_and_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    assert get_address() == client.DEFAULT_ADDRESS == ("127.0.0.1", 1664)
    monkeypatch.setenv(ADDRESS_ENV, "")  # empty counts as unset
    assert get_address() == ("127.0.0.1", 1664)
    monkeypatch.setenv(ADDRESS_ENV, "[::1]:7000")
    assert get_address() == ("::1", 7000)
    assert get_address("127.0.0.2:7001") == ("127.0.0.2", 7001)
    assert get_address(("127.0.0.3", 7002)) == ("127.0.0.3", 7002)
    monkeypatch.setenv(ADDRESS_ENV, "nonsense")
    assert get_address(("127.0.0.3", 7002)) == ("127.0.0.3", 7002)  # argument wins


@pytest.mark.parametrize(
    "address", [("127.0.0.1", 0), ("127.0.0.1", 70000), ("", 1664), ("h", True)]
)
def test_address_tuple_is_checked(address: tuple[str, int]) -> None:
    with pytest.raises(ValueError, match="^address: "):
        get_address(address)


def test_env_address_is_honoured(
    receiver: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ADDRESS_ENV, f"127.0.0.1:{port_of(receiver)}")
    assert send_heartbeat() is True
    assert pids(collect(receiver, 5.0, limit=1)) == {os.getpid()}
    with HeartbeatThread(interval=0.05) as beat:
        assert beat.address == ("127.0.0.1", port_of(receiver))
        assert pids(collect(receiver, 5.0, limit=2)) == {os.getpid()}


def test_bad_env_address_raises_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ADDRESS_ENV, "127.0.0.1")
    with pytest.raises(ValueError, match=ADDRESS_ENV):
        get_address()
    with pytest.raises(ValueError, match=ADDRESS_ENV):
        send_heartbeat()
    with pytest.raises(ValueError, match=ADDRESS_ENV):
        HeartbeatThread()

    async def start() -> None:
        start_heartbeat_task()

    with pytest.raises(ValueError, match=ADDRESS_ENV):
        asyncio.run(start())


def test_ipv6(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        sock = _receiver(socket.AF_INET6, "::1")
    except OSError:
        pytest.skip("no IPv6 loopback")
    with sock:
        monkeypatch.setenv(ADDRESS_ENV, f"[::1]:{port_of(sock)}")
        assert send_heartbeat() is True
        assert pids(collect(sock, 5.0, limit=1)) == {os.getpid()}


# -- send_heartbeat -------------------------------------------------------


def test_send_heartbeat(receiver: socket.socket) -> None:
    fds = open_fds()
    assert send_heartbeat(("127.0.0.1", port_of(receiver))) is True
    assert send_heartbeat(f"127.0.0.1:{port_of(receiver)}", pid=4242) is True
    assert open_fds() == fds  # each call closes its socket
    got = collect(receiver, 5.0, limit=2)
    assert [core_parse(d) for d in got] == [os.getpid(), 4242]


def test_no_listener_does_not_raise() -> None:
    with _receiver(socket.AF_INET, "127.0.0.1") as sock:
        port = port_of(sock)  # free now, and nothing listens once closed
    for _ in range(3):
        assert send_heartbeat(("127.0.0.1", port)) is True
    with HeartbeatThread(0.01, ("127.0.0.1", port)) as beat:  # one socket
        deadline = time.monotonic() + 5.0
        while beat.sent + beat.errors < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert beat.is_alive()
    assert beat.sent + beat.errors >= 5


@pytest.fixture(params=["resolve", "sendto"])
def failing(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Make every send fail: in getaddrinfo, or in sendto (to port 0: EINVAL)."""

    def resolve(*args: object) -> tuple[int, tuple[str, int]]:
        if request.param == "resolve":
            raise socket.gaierror(socket.EAI_NONAME, "no such host")
        return socket.AF_INET, ("127.0.0.1", 0)

    async def aresolve(*args: object) -> tuple[int, tuple[str, int]]:
        return resolve()

    monkeypatch.setattr(client, "_resolve", resolve)
    monkeypatch.setattr(client, "_aresolve", aresolve)
    return request.param  # type: ignore[no-any-return]


def test_failed_send_returns_false(failing: str) -> None:
    fds = open_fds()
    assert send_heartbeat() is False
    assert open_fds() == fds


# -- HeartbeatThread ------------------------------------------------------


def test_thread_sends_about_every_interval(receiver: socket.socket) -> None:
    fds = open_fds()
    beat = HeartbeatThread(interval=0.05, address=("127.0.0.1", port_of(receiver)))
    assert beat.daemon
    beat.start()
    try:
        got = collect(receiver, 1.0)
    finally:
        assert beat.stop() is True
    assert not beat.is_alive()
    assert 5 <= len(got) <= 40
    assert pids(got) == {os.getpid()}
    got += collect(receiver, 0.3)  # whatever was in flight at stop()
    assert beat.sent == len(got)
    assert beat.errors == 0
    assert collect(receiver, 0.2) == []  # and nothing after
    assert open_fds() == fds  # the thread closed its socket


def test_thread_stops_promptly_with_a_long_interval(receiver: socket.socket) -> None:
    with HeartbeatThread(60.0, ("127.0.0.1", port_of(receiver))) as beat:
        assert len(collect(receiver, 5.0, limit=1)) == 1  # the first beat is at once
        started = time.monotonic()
    assert time.monotonic() - started < 2.0
    assert not beat.is_alive()


def test_thread_counts_errors_and_keeps_going(failing: str) -> None:
    with HeartbeatThread(0.01) as beat:
        deadline = time.monotonic() + 5.0
        while beat.errors < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert beat.is_alive()
    assert beat.errors >= 3
    assert beat.sent == 0


def test_thread_stop_before_start() -> None:
    beat = HeartbeatThread()
    assert beat.stop() is True


@pytest.mark.parametrize("interval", [0, -1.0, math.nan, math.inf])
def test_bad_interval(interval: float) -> None:
    with pytest.raises(ValueError, match="interval"):
        HeartbeatThread(interval)

    async def start() -> None:
        start_heartbeat_task(interval)

    with pytest.raises(ValueError, match="interval"):
        asyncio.run(start())
    with pytest.raises(ValueError, match="interval"):
        asyncio.run(heartbeat_task(interval))


# -- asyncio --------------------------------------------------------------


def _asyncio_loop() -> asyncio.AbstractEventLoop:
    return asyncio.new_event_loop()


def _uvloop_loop() -> asyncio.AbstractEventLoop:
    uvloop = pytest.importorskip("uvloop")
    return uvloop.new_event_loop()  # type: ignore[no-any-return]


@pytest.fixture(params=[_asyncio_loop, _uvloop_loop], ids=["asyncio", "uvloop"])
def run(
    request: pytest.FixtureRequest,
) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """Run a coroutine to completion on a fresh loop of each kind."""
    factory: Callable[[], asyncio.AbstractEventLoop] = request.param

    def run(coro: Coroutine[Any, Any, Any]) -> Any:
        loop = factory()
        try:
            return loop.run_until_complete(asyncio.wait_for(coro, 20.0))
        finally:
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    return run


def test_task_sends_and_stops_on_cancel(
    receiver: socket.socket, run: Callable[[Coroutine[Any, Any, Any]], Any]
) -> None:
    async def scenario() -> int:
        fds = open_fds()
        task = start_heartbeat_task(0.05, ("127.0.0.1", port_of(receiver)))
        assert task.get_name() == "circus-watchdog-heartbeat"
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return fds - open_fds()

    assert run(scenario()) == 0  # the task closed its socket
    got = collect(receiver, 0.3)
    assert 3 <= len(got) <= 20
    assert pids(got) == {os.getpid()}
    assert collect(receiver, 0.2) == []


def test_task_resolves_host_names(
    run: Callable[[Coroutine[Any, Any, Any]], Any],
) -> None:
    try:
        info = socket.getaddrinfo("localhost", 0, type=socket.SOCK_DGRAM)[0]
    except OSError:
        pytest.skip("localhost does not resolve")
    with _receiver(info[0], str(info[4][0])) as sock:

        async def scenario() -> None:
            task = asyncio.ensure_future(
                heartbeat_task(0.05, ("localhost", port_of(sock)))
            )
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        run(scenario())
        assert pids(collect(sock, 1.0)) == {os.getpid()}


def test_task_survives_failed_sends(
    failing: str, run: Callable[[Coroutine[Any, Any, Any]], Any]
) -> None:
    async def scenario() -> None:
        task = start_heartbeat_task(0.01)
        await asyncio.sleep(0.1)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(scenario())


# -- CLI ------------------------------------------------------------------


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "circus_watchdog.client", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def test_cli_subprocess_sends_its_own_pid(receiver: socket.socket) -> None:
    address = f"127.0.0.1:{port_of(receiver)}"
    with _cli("--count", "3", "--interval", "0.05", "--address", address) as proc:
        out, err = proc.communicate(timeout=30)
    assert (proc.returncode, out, err) == (0, "", "")
    got = collect(receiver, 5.0, limit=3)
    assert len(got) == 3
    assert pids(got) == {proc.pid}
    assert collect(receiver, 0.2) == []


def test_cli_subprocess_env_address(receiver: socket.socket) -> None:
    env = {ADDRESS_ENV: f"127.0.0.1:{port_of(receiver)}"}
    with _cli("--count", "1", env=env) as proc:
        assert proc.communicate(timeout=30) == ("", "")
    assert proc.returncode == 0
    assert pids(collect(receiver, 5.0, limit=1)) == {proc.pid}


def test_cli_bad_env_address() -> None:
    with _cli("--count", "1", env={ADDRESS_ENV: "1664"}) as proc:
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert ADDRESS_ENV in err


def test_cli_in_process(receiver: socket.socket) -> None:
    address = f"127.0.0.1:{port_of(receiver)}"
    argv = ["--count", "2", "--interval", "0.01", "--address", address]
    parent = os.getppid()  # alive, and not this process
    assert main([*argv, "--pid", str(parent)]) == 0
    got = collect(receiver, 5.0, limit=2) + collect(receiver, 0.2)
    assert [core_parse(d) for d in got] == [parent, parent]


def test_cli_reports_failed_sends(
    failing: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--count", "3", "--interval", "0.01"]) == 1
    err = capsys.readouterr().err
    assert err.count("cannot send") == 1  # said once, not once per beat


@pytest.mark.parametrize(
    "argv",
    [
        ["--interval", "0"],
        ["--interval", "x"],
        ["--count", "0"],
        ["--pid", "0"],
        ["--address", "127.0.0.1"],
    ],
)
def test_cli_rejects(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_cli_stops_when_its_pid_is_gone(receiver: socket.socket) -> None:
    with subprocess.Popen([sys.executable, "-c", "pass"]) as gone:
        gone.wait(timeout=30)
    address = f"127.0.0.1:{port_of(receiver)}"
    started = time.monotonic()
    assert main(["--pid", str(gone.pid), "--address", address]) == 0
    assert time.monotonic() - started < 5.0
    assert collect(receiver, 0.2) == []


# -- the examples in docs/clients.md --------------------------------------


def doc_block(name: str) -> tuple[str, str]:
    """The language and code of the block after ``<!-- test: name -->`` in the doc."""
    text = DOC.read_text(encoding="utf-8")
    match = re.search(
        rf"<!-- test: {re.escape(name)} -->\n```(\w*)\n(.*?)^```", text, re.M | re.S
    )
    assert match, f"no `<!-- test: {name} -->` block in {DOC}"
    return match.group(1), match.group(2)


def first_datagram_from(cmd: list[str], sock: socket.socket) -> tuple[int, bytes]:
    """Run ``cmd`` in its own process group until one datagram arrives."""
    proc = subprocess.Popen(cmd, start_new_session=True, stderr=subprocess.PIPE)
    try:
        got = collect(sock, 10.0, limit=1)
        if not got and proc.poll() is not None:
            assert proc.stderr is not None
            err = proc.stderr.read()
            pytest.fail(f"{cmd} exited {proc.returncode}: {err!r}")
        assert got, f"nothing from {cmd}"
        pid = core_parse(got[0])
        assert pid is not None, got
        assert os.getpgid(pid) == proc.pid  # sent from inside this process group
        return proc.pid, got[0]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert proc.stderr is not None
        proc.stderr.close()


def test_doc_c_snippet(receiver: socket.socket, tmp_path: Path) -> None:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not on PATH")
    lang, code = doc_block("c-snippet")
    assert lang == "c"
    (tmp_path / "heartbeat.c").write_text(code, encoding="utf-8")
    subprocess.run(
        [gcc, "-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-O2"]
        + [f"-DWATCHDOG_PORT={port_of(receiver)}", "-o", "heartbeat", "heartbeat.c"],
        cwd=tmp_path,
        check=True,
        timeout=60,
    )
    pid, data = first_datagram_from([str(tmp_path / "heartbeat")], receiver)
    assert core_parse(data) == pid
    assert re.fullmatch(rb"\d+;\d+\.\d{3}", data)


SHELL_EXAMPLES = {
    # name: (tool it needs, address text in the doc, its template)
    "bash-oneliner": ("bash", "/dev/udp/127.0.0.1/1664", "/dev/udp/127.0.0.1/{}"),
    "socat": ("socat", "UDP-SENDTO:127.0.0.1:1664", "UDP-SENDTO:127.0.0.1:{}"),
    "nc": ("nc", "nc -u -w1 127.0.0.1 1664", "nc -u -w1 127.0.0.1 {}"),
}


@pytest.mark.parametrize("name", SHELL_EXAMPLES)
def test_doc_shell_examples(name: str, receiver: socket.socket) -> None:
    tool, where, template = SHELL_EXAMPLES[name]
    shell, snippet = doc_block(name)
    assert shell in ("bash", "sh")  # run each block by the shell it names
    for needed in {shell, "timeout", tool}:
        if shutil.which(needed) is None:
            pytest.skip(f"{needed} is not on PATH")
    if name == "nc":
        usage = subprocess.run(["nc", "-h"], capture_output=True, text=True, timeout=10)
        if "OpenBSD" not in usage.stdout + usage.stderr:
            pytest.skip("nc is not OpenBSD netcat")
    assert where in snippet
    script = snippet.replace(where, template.format(port_of(receiver))) + "wait\n"
    # `timeout` bounds the background loop even if this test dies: it kills
    # its whole process group when the time is up.
    _, data = first_datagram_from(["timeout", "20", shell, "-c", script], receiver)
    assert re.fullmatch(rb"\d+;\d+", data)
