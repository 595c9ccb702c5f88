"""Metrics through prometheus_client and the HTTP endpoint, on real loopback
sockets (no circusd). Every exposition is read with prometheus_client's own
parsers."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import shlex
import shutil
import socket
import types
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import generate_latest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from circus_watchdog import metrics as metrics_module
from circus_watchdog.core import DrainCounts
from circus_watchdog.metrics import (
    CAPTURE_FAILURE_REASONS,
    Metrics,
    Readings,
    make_registry,
    serve_http,
)

INFO = {"version": "9.9", "core": "c", "loop": "uvloop"}

# Every series of the watchdog's own and its type, as the text format names it.
SERIES = {
    "circus_watchdog_datagrams_total": "counter",
    "circus_watchdog_heartbeats_total": "counter",
    "circus_watchdog_unknown_pid_total": "counter",
    "circus_watchdog_malformed_total": "counter",
    "circus_watchdog_stale_total": "counter",
    "circus_watchdog_kernel_drops_total": "counter",
    "circus_watchdog_kill_failures_total": "counter",
    "circus_watchdog_would_kill_total": "counter",
    "circus_watchdog_kills_held_total": "counter",
    "circus_watchdog_stalls_total": "counter",
    "circus_watchdog_resyncs_total": "counter",
    "circus_watchdog_control_truncated_total": "counter",
    "circus_watchdog_captures_total": "counter",
    "circus_watchdog_capture_failures_total": "counter",
    "circus_watchdog_kills_total": "counter",
    "circus_watchdog_monitored_pids": "gauge",
    "circus_watchdog_circusd_connected": "gauge",
    "circus_watchdog_excluded_pids": "gauge",
    "circus_watchdog_info": "gauge",  # the text format has no info type
}


def readings(**changes: Any) -> Readings:
    base = Readings(
        monitored_pids=7,
        connected=True,
        watchers=("idle", "web"),
        excluded_pids=2,
        kernel_drops=4,
        control_truncated=1,
    )
    return base._replace(**changes)


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a text exposition."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def exposition(m: Metrics, read: Callable[[], Readings]) -> str:
    return generate_latest(make_registry(m, read, INFO)).decode()


def test_every_series_with_its_type_and_value() -> None:
    m = Metrics()
    m.count_drain(DrainCounts(10, 6, 3, 1, 0))
    m.kills["web"] += 2
    m.kills['we"ird'] += 1  # a watcher gone since: its count stays
    m.would_kill, m.stalls, m.resyncs = 5, 8, 9
    m.kills_held["starved"] += 6
    m.kill_failures, m.captures = 11, 12
    m.capture_failures["timeout"] += 3
    text = exposition(m, readings)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    types_ = {}
    for family in families.values():
        name = family.name
        if family.type == "counter":
            name += "_total"
        elif family.type == "info":
            name += "_info"
        types_[name] = family.type
    assert {k: v for k, v in types_.items() if k.startswith("circus_")} == SERIES
    values = scrape(text)
    no: tuple[tuple[str, str], ...] = ()
    expected = {
        "datagrams_total": 10,
        "heartbeats_total": 6,
        "unknown_pid_total": 3,
        "malformed_total": 1,
        "stale_total": 0,
        "kernel_drops_total": 4,
        "control_truncated_total": 1,
        "would_kill_total": 5,
        "stalls_total": 8,
        "resyncs_total": 9,
        "kill_failures_total": 11,
        "captures_total": 12,
        "monitored_pids": 7,
        "circusd_connected": 1,
        "excluded_pids": 2,
    }
    for name, value in expected.items():
        assert values[("circus_watchdog_" + name, no)] == value, name
    held = {
        labels: v
        for (name, labels), v in values.items()
        if name == "circus_watchdog_kills_held_total"
    }
    # Every reason is present from the first scrape, at 0 until counted.
    assert held == {
        (("reason", "stall"),): 0,
        (("reason", "kernel_drops"),): 0,
        (("reason", "storm"),): 0,
        (("reason", "starved"),): 6,
        (("reason", "traced"),): 0,
    }
    kills = {
        labels: v
        for (name, labels), v in values.items()
        if name == "circus_watchdog_kills_total"
    }
    assert kills == {
        (("watcher", "idle"),): 0,  # monitored, never killed: present at 0
        (("watcher", "web"),): 2,
        (("watcher", 'we"ird'),): 1,
    }
    failures = {
        dict(labels)["reason"]: v
        for (name, labels), v in values.items()
        if name == "circus_watchdog_capture_failures_total"
    }
    assert failures == {"timeout": 3, "error": 0, "skipped": 0}
    assert set(failures) == set(CAPTURE_FAILURE_REASONS)
    info = ("circus_watchdog_info", tuple(sorted(INFO.items())))
    assert values[info] == 1


def test_process_and_python_metrics() -> None:
    names = {
        f.name for f in text_string_to_metric_families(exposition(Metrics(), readings))
    }
    for name in (
        "process_cpu_seconds",
        "process_resident_memory_bytes",
        "process_open_fds",
        "python_info",
        "python_gc_collections",
    ):
        assert name in names


def test_readings_are_read_at_each_scrape() -> None:
    """State owned elsewhere is not copied: each scrape asks for it."""
    current = [readings(monitored_pids=1, connected=False, watchers=())]
    registry = make_registry(Metrics(), lambda: current[0], {})
    first = scrape(generate_latest(registry).decode())
    assert first[("circus_watchdog_monitored_pids", ())] == 1
    assert first[("circus_watchdog_circusd_connected", ())] == 0
    assert not [k for k in first if k[0] == "circus_watchdog_kills_total"]
    assert not [k for k in first if k[0] == "circus_watchdog_info"]  # none given
    current[0] = readings(monitored_pids=3, watchers=("new",), kernel_drops=9)
    second = scrape(generate_latest(registry).decode())
    assert second[("circus_watchdog_monitored_pids", ())] == 3
    assert second[("circus_watchdog_circusd_connected", ())] == 1
    assert second[("circus_watchdog_kernel_drops_total", ())] == 9
    assert second[("circus_watchdog_kills_total", (("watcher", "new"),))] == 0


# -- the HTTP endpoint -------------------------------------------------------


async def _get(port: int, request: bytes) -> tuple[bytes, bytes]:
    """(head, body) of one request's reply; b'' and b'' if the server closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def _header(head: bytes, name: str) -> str:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.decode().partition(":")
        if key.lower() == name:
            return value.strip()
    raise AssertionError(f"no {name} in {head!r}")


def run_server(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
    body: Callable[[int], Awaitable[None]],
    m: Metrics | None = None,
    status: Callable[[], Any] = lambda: {"pids": [1]},
) -> list[dict[str, Any]]:
    """Run ``body(port)`` against a server; the loop's unhandled exceptions."""
    errors: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(
            lambda _loop, context: errors.append(context)
        )
        registry = make_registry(m or Metrics(), readings, INFO)
        server = await serve_http("127.0.0.1", 0, registry, status)
        try:
            await body(server.sockets[0].getsockname()[1])
        finally:
            server.close()
            await server.wait_closed()

    loop = loop_factory()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    return errors


def test_http_endpoint(loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
    m = Metrics(heartbeats=5)

    async def body(port: int) -> None:
        head, text = await _get(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200 OK\r\n")
        assert _header(head, "content-type").startswith("text/plain; version=0.0.4")
        assert scrape(text.decode())[("circus_watchdog_heartbeats_total", ())] == 5
        head, text = await _get(port, b"GET /status HTTP/1.0\r\n\r\n")
        assert _header(head, "content-type") == "application/json"
        assert orjson.loads(text) == {"pids": [1]}
        head, _ = await _get(port, b"GET /nope HTTP/1.0\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 404")
        head, _ = await _get(port, b"POST /metrics HTTP/1.0\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 405")
        # A request that never ends in a blank line, past the size bound.
        try:
            head, _ = await _get(
                port, b"GET /metrics HTTP/1.0\r\n" + b"X: y\r\n" * 4000
            )
        except ConnectionResetError:  # closed with our bytes unread
            head = b""
        assert head == b""

    assert run_server(loop_factory, body, m) == []


@pytest.mark.parametrize(
    "accept",
    [
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
        "application/openmetrics-text",
        "text/plain;q=0.5, application/openmetrics-text;version=1.0.0;q=1",
        # What a Prometheus 2 server sends by default.
        "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
        "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    ],
)
def test_openmetrics_negotiation(
    accept: str, loop_factory: Callable[[], asyncio.AbstractEventLoop]
) -> None:
    """What Prometheus asks for first (OpenMetrics) is what it gets."""
    m = Metrics(heartbeats=5)

    async def body(port: int) -> None:
        request = f"GET /metrics HTTP/1.1\r\nAccept: {accept}\r\n\r\n"
        head, text = await _get(port, request.encode())
        assert head.startswith(b"HTTP/1.0 200 OK\r\n")
        ctype = _header(head, "content-type")
        assert ctype.startswith("application/openmetrics-text; version=")
        assert text.endswith(b"# EOF\n")
        families = {f.name: f for f in openmetrics_families(text.decode())}
        beats = families["circus_watchdog_heartbeats"]
        assert beats.type == "counter"
        assert [s.value for s in beats.samples] == [5]
        kills = families["circus_watchdog_kills"].samples
        assert {s.labels["watcher"]: s.value for s in kills} == {"idle": 0, "web": 0}
        assert families["circus_watchdog"].type == "info"
        assert "process_cpu_seconds" in families

    assert run_server(loop_factory, body, m) == []


def test_a_failing_scrape_answers_500(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("boom")

    async def body(port: int) -> None:
        head, _ = await _get(port, b"GET /status HTTP/1.0\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 500")
        head, _ = await _get(port, b"GET /metrics HTTP/1.0\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200")  # the server stays up

    assert run_server(loop_factory, body, status=broken) == []
    assert "boom" in caplog.text


# -- a client that never sends its request -----------------------------------


@pytest.fixture
def short_timeout(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(metrics_module, "_REQUEST_TIMEOUT", 0.2)
    return 0.2


class Py310TimeoutError(Exception):
    """What ``asyncio.wait_for`` raises on Python 3.10: asyncio's own
    TimeoutError, which is no builtin TimeoutError."""


@pytest.fixture(params=["native", "py310"])
def timeout_semantics(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """The running Python's asyncio, or one whose ``wait_for`` raises a
    TimeoutError distinct from the builtin, as 3.10's does (seen by the
    metrics module only)."""
    if request.param == "py310":
        real_wait_for = asyncio.wait_for

        async def wait_for(aw: Awaitable[Any], timeout: float | None) -> Any:
            try:
                return await real_wait_for(aw, timeout)
            except TimeoutError as exc:
                raise Py310TimeoutError from exc

        fake = types.SimpleNamespace(**vars(asyncio))
        fake.TimeoutError = Py310TimeoutError
        fake.wait_for = wait_for
        monkeypatch.setattr(metrics_module, "asyncio", fake)
        assert not issubclass(Py310TimeoutError, TimeoutError)
    yield request.param


@pytest.mark.parametrize(
    "sent", [b"", b"GET /metrics HTTP/1.0\r\n"], ids=["nothing", "half"]
)
def test_a_slow_client_is_closed_quietly(
    sent: bytes,
    short_timeout: float,
    timeout_semantics: str,
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """A client that sends nothing, or half a request, is closed after the
    request timeout with nothing sent and nothing raised into the loop."""
    closed: list[bytes] = []

    async def body(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(sent)
        await writer.drain()
        # Bounded: 25 request timeouts, then the test fails.
        closed.append(await asyncio.wait_for(reader.read(), 25 * short_timeout))
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        # The server still answers the next client.
        head, _ = await _get(port, b"GET /metrics HTTP/1.0\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200")

    errors = run_server(loop_factory, body)
    assert closed == [b""]
    assert errors == [], [e.get("exception") for e in errors]


# -- the address ---------------------------------------------------------------


def test_a_taken_port_names_the_option_and_address(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]

    async def main(host: str, port: int) -> OSError:
        registry = make_registry(Metrics(), readings, INFO)
        with pytest.raises(OSError) as caught:
            await serve_http(host, port, registry, dict)
        return caught.value

    loop = loop_factory()
    try:
        in_use = loop.run_until_complete(main("127.0.0.1", port))
        # TEST-NET-1 (RFC 5737): no local interface has it, nothing is sent.
        foreign = loop.run_until_complete(main("192.0.2.1", 0))
    finally:
        loop.close()
        taken.close()
    assert in_use.errno == errno.EADDRINUSE
    assert str(in_use) == (
        f"metrics_port: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    assert foreign.errno == errno.EADDRNOTAVAIL
    assert "metrics_host: cannot listen on 192.0.2.1:0: " in str(foreign)
    assert "\n" not in str(in_use) + str(foreign)


# -- docs/operations.md ----------------------------------------------------------

DOC = Path(__file__).resolve().parent.parent / "docs" / "operations.md"
DOC_PORT = "9664"


def doc_section() -> str:
    text = DOC.read_text()
    return text[text.index("## Metrics\n") : text.index("### Example alert rules")]


def doc_blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", doc_section(), re.M | re.S)


def test_doc_table_is_what_is_served() -> None:
    """The table names every circus_watchdog_* series served, and no other."""
    row = r"^\| `(circus_watchdog_\w+)(?:\{([\w,]+)\})?` \| (\w+) \|"
    rows = re.findall(row, doc_section(), re.M)
    assert len(rows) == len(SERIES)
    assert {name: kind for name, _, kind in rows} == SERIES
    m = Metrics()
    m.kills["web"] = 1
    served: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(exposition(m, readings)):
        for sample in family.samples:
            if sample.name.startswith("circus_watchdog_"):
                served.setdefault(sample.name, set()).update(sample.labels)
    assert {name: set(filter(None, labels.split(","))) for name, labels, _ in rows} == (
        served
    )


def test_doc_error_line(loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
    """The error the docs quote for a taken port is the one raised."""
    (quoted,) = doc_blocks("")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def main() -> str:
            registry = make_registry(Metrics(), readings, INFO)
            with pytest.raises(OSError) as caught:
                await serve_http("127.0.0.1", port, registry, dict)
            return str(caught.value)

        loop = loop_factory()
        try:
            error = loop.run_until_complete(main())
        finally:
            loop.close()
    assert error == quoted.strip().replace(DOC_PORT, str(port))


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_doc_curl_command(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """The docs' curl command gets OpenMetrics from a running server."""
    (command,) = doc_blocks("sh")

    async def body(port: int) -> None:
        argv = shlex.split(command.replace(DOC_PORT, str(port)))
        direct = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, env=direct
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0
        assert out.endswith(b"# EOF\n")
        names = {f.name for f in openmetrics_families(out.decode())}
        assert {"circus_watchdog_kills", "process_cpu_seconds"} <= names

    assert run_server(loop_factory, body) == []
