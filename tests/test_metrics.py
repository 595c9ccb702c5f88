"""Metrics rendering and the HTTP endpoint, on a real loopback socket."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import orjson

from circus_watchdog.core import DrainCounts
from circus_watchdog.metrics import Metrics, serve_http

CONTRACT = [
    "circus_watchdog_datagrams_total",
    "circus_watchdog_heartbeats_total",
    "circus_watchdog_unknown_pid_total",
    "circus_watchdog_malformed_total",
    "circus_watchdog_kills_total",
    "circus_watchdog_monitored_pids",
]


def test_render_has_the_contract_names() -> None:
    m = Metrics()
    m.count_drain(DrainCounts(10, 6, 3, 1))
    m.kills["web"] += 2
    m.kills['we"ird'] += 1
    m.monitored_pids = 7
    text = m.render()
    for name in CONTRACT:
        assert f"# TYPE {name} " in text
    assert "circus_watchdog_datagrams_total 10\n" in text
    assert "circus_watchdog_heartbeats_total 6\n" in text
    assert "circus_watchdog_unknown_pid_total 3\n" in text
    assert "circus_watchdog_malformed_total 1\n" in text
    assert 'circus_watchdog_kills_total{watcher="web"} 2\n' in text
    assert 'circus_watchdog_kills_total{watcher="we\\"ird"} 1\n' in text
    assert "circus_watchdog_monitored_pids 7\n" in text


async def _get(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()
    return data


def test_http_endpoint(loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
    async def main() -> None:
        m = Metrics()
        m.heartbeats = 5
        server = await serve_http("127.0.0.1", 0, m.render, lambda: {"pids": [1]})
        port = server.sockets[0].getsockname()[1]
        try:
            ok = await _get(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert ok.startswith(b"HTTP/1.0 200 OK\r\n")
            assert b"circus_watchdog_heartbeats_total 5\n" in ok
            status = await _get(port, b"GET /status HTTP/1.0\r\n\r\n")
            assert orjson.loads(status.split(b"\r\n\r\n", 1)[1]) == {"pids": [1]}
            missing = await _get(port, b"GET /nope HTTP/1.0\r\n\r\n")
            assert missing.startswith(b"HTTP/1.0 404")
            post = await _get(port, b"POST /metrics HTTP/1.0\r\n\r\n")
            assert post.startswith(b"HTTP/1.0 405")
            # A request that never ends in a blank line, past the size bound.
            try:
                huge = await _get(
                    port, b"GET /metrics HTTP/1.0\r\n" + b"X: y\r\n" * 4000
                )
            except ConnectionResetError:  # closed with our bytes unread
                huge = b""
            assert huge == b""
        finally:
            server.close()
            await server.wait_closed()

    loop = loop_factory()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
