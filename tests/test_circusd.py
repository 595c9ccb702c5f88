"""circusd.py against a real circusd, on asyncio's loop and on uvloop."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq
import zmq.asyncio

from circus_watchdog.circusd import (
    RESYNC_ACTIONS,
    CallTimeout,
    CircusError,
    CommandClient,
    Event,
    EventSubscriber,
    parse_topic,
    topic_name,
)
from support import CONFLICT, SLEEPER, Circusd, circusd_pool, free_port, run

LoopFactory = Callable[[], asyncio.AbstractEventLoop]

# Names the way circus publishes them: lower-cased (the ini says "Web.Api").
WEB = "web.api"
PLAIN = "plain"


@pytest.fixture(scope="module")
def circusd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Circusd]:
    """One circusd for the module: two watchers, one with dots in its name."""
    sections = f"""
[watcher:Web.Api]
cmd = {SLEEPER}
numprocesses = 1
graceful_timeout = 2

[watcher:{PLAIN}]
cmd = {SLEEPER}
numprocesses = 2
graceful_timeout = 2
"""
    with circusd_pool(tmp_path_factory.mktemp("circusd")) as start:
        # A short check_delay: reap events come from circusd's periodic sweep.
        daemon = start(sections, check_delay=0.3)
        daemon.wait_for(lambda: len(daemon.pids(PLAIN)) == 2, timeout=10)
        daemon.wait_for(lambda: daemon.pids(WEB), timeout=10)
        yield daemon


async def next_event(
    sub: EventSubscriber, match: Callable[[Event], bool], timeout: float = 5.0
) -> Event:
    """The first event that ``match`` accepts, within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    for _ in range(10_000):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            event = await asyncio.wait_for(sub.recv(), left)
        except asyncio.TimeoutError:
            break
        if match(event):
            return event
    raise AssertionError(f"no matching event within {timeout} s")


async def call(client: CommandClient, command: str, **props: Any) -> dict[str, Any]:
    """``client.call``, retried while circusd runs another exclusive command."""
    for _ in range(50):
        try:
            return await client.call(command, **props)
        except CircusError as exc:
            if not exc.reason.startswith(CONFLICT):
                raise
        await asyncio.sleep(0.1)
    raise AssertionError(f"circusd stayed busy: {command} {props}")


async def subscribed(client: CommandClient, sub: EventSubscriber) -> None:
    """Wait until ``sub`` gets events: a SUB misses what is sent as it joins."""
    for _ in range(50):
        # A no-op option change: circusd publishes "updated" for it.
        await call(client, "set", name=PLAIN, options={"warmup_delay": 0})
        try:
            await next_event(sub, lambda e: e.action == "updated", timeout=0.2)
        except AssertionError:
            continue
        return
    raise AssertionError("the subscriber never got an event")


async def clients(daemon: Circusd) -> tuple[CommandClient, EventSubscriber]:
    client = CommandClient(daemon.endpoint, timeout=5.0)
    sub = EventSubscriber(daemon.pubsub)
    await client.start()
    await sub.start()
    await subscribed(client, sub)
    return client, sub


# parse_topic


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        (b"watcher.web.spawn", ("web", "spawn")),
        (b"watcher.web.api.v2.reap", ("web.api.v2", "reap")),
        (b"watcher.w.x", ("w", "x")),
        (b"watcher.web", None),
        (b"watcher.", None),
        (b"watcher..spawn", None),
        (b"watcher.web.", None),
        (b"watcher", None),
        (b"", None),
        (b"stats.web.spawn", None),
        (b"watchers.web.spawn", None),
        (b"watcher.\xff\xfe.spawn", None),
        (b"\xffwatcher.web.spawn", None),
        ("watcher.caf\u00e9.spawn".encode(), ("caf\u00e9", "spawn")),
    ],
)
def test_parse_topic(topic: bytes, expected: tuple[str, str] | None) -> None:
    assert parse_topic(topic) == expected


def test_topic_name() -> None:
    assert topic_name("My Job.v2") == "my_job.v2"


def test_resync_actions() -> None:
    assert {"start", "stop", "add", "remove"} <= RESYNC_ACTIONS
    assert not {"spawn", "reap", "kill"} & RESYNC_ACTIONS


def test_errors() -> None:
    err = CallTimeout("list", "no reply in 1 s")
    assert isinstance(err, CircusError)
    assert isinstance(err, TimeoutError)
    assert (err.command, err.reason) == ("list", "no reply in 1 s")
    assert "list" in str(err) and "no reply in 1 s" in str(err)
    copy = pickle.loads(pickle.dumps(err))
    assert (type(copy), copy.command, copy.reason) == (CallTimeout, "list", err.reason)


# CommandClient


@pytest.mark.circusd  # the module's circusd fixture starts one
def test_list(loop_factory: LoopFactory, circusd: Circusd) -> None:
    async def main() -> None:
        client = CommandClient(circusd.endpoint)
        await client.start()
        try:
            res = await client.call("list")
            assert res["status"] == "ok"
            assert res["watchers"] == sorted([WEB, PLAIN])
            res = await client.call("list", name=PLAIN)
            assert sorted(res["pids"]) == circusd.pids(PLAIN)
            assert len(res["pids"]) == 2
        finally:
            await client.close()

    run(loop_factory, main())


@pytest.mark.circusd  # the module's circusd fixture starts one
def test_errors_carry_reason(loop_factory: LoopFactory, circusd: Circusd) -> None:
    async def main() -> None:
        client = CommandClient(circusd.endpoint)
        await client.start()
        try:
            with pytest.raises(CircusError) as info:
                await client.call("no-such-command")
            assert info.value.command == "no-such-command"
            assert info.value.reason == "unknown command: 'no-such-command'"
            with pytest.raises(CircusError) as info:
                await client.call("list", name="nobody")
            assert info.value.reason == "program nobody not found"
            assert "nobody" in str(info.value) and "list" in str(info.value)
            assert not isinstance(info.value, CallTimeout)
        finally:
            await client.close()

    run(loop_factory, main())


@pytest.mark.circusd  # the module's circusd fixture starts one
def test_late_reply_is_dropped(loop_factory: LoopFactory, circusd: Circusd) -> None:
    async def main() -> None:
        client = CommandClient(circusd.endpoint)
        await client.start()
        try:
            await client.call("list")  # connected
            client.timeout = 1e-6
            with pytest.raises(CallTimeout):
                await client.call("list", name=PLAIN)
            client.timeout = 5.0
            # The late "pids" reply must not answer this call.
            assert "watchers" in await client.call("list")
        finally:
            await client.close()

    run(loop_factory, main())


class _BrokenOnce(dict):  # type: ignore[type-arg]
    """The pending-replies map, whose first lookup raises: a reader bug."""

    broken = True

    def get(self, key: Any, default: Any = None) -> Any:
        if self.broken:
            self.broken = False
            raise RuntimeError("a bug in the reply reader")
        return super().get(key, default)


def test_a_failed_reader_is_logged_and_reconnects(
    loop_factory: LoopFactory, circusd: Circusd, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str] = []

    async def main() -> None:
        client = CommandClient(
            circusd.endpoint,
            on_connect=lambda: seen.append("connect"),
            on_disconnect=lambda: seen.append("disconnect"),
        )
        await client.start()
        try:
            await client.call("list")
            client._pending = _BrokenOnce(client._pending)
            with pytest.raises(CircusError) as info:
                await client.call("list")
            assert not isinstance(info.value, CallTimeout)  # at once, no timeout
            assert info.value.reason == "the connection was reset"
            # The reconnect path: a new socket that answers.
            assert "watchers" in await client.call("list")
            for _ in range(100):
                if seen[-1:] == ["connect"] and "disconnect" in seen:
                    break
                await asyncio.sleep(0.01)
        finally:
            await client.close()

    with caplog.at_level("ERROR", "circus_watchdog.circusd"):
        run(loop_factory, main())
    assert "disconnect" in seen and seen[-1] == "connect", seen
    failed = [
        r
        for r in caplog.records
        if "reading circusd's replies failed" in r.getMessage()
    ]
    assert len(failed) == 1 and "a bug in the reply reader" in caplog.text


def test_nothing_listening(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        client = CommandClient(f"tcp://127.0.0.1:{free_port()}", timeout=0.5)
        await client.start()
        try:
            start = time.monotonic()
            with pytest.raises(CallTimeout) as info:
                await client.call("list")
            assert 0.4 < time.monotonic() - start < 2.0
            assert info.value.command == "list"
            with pytest.raises(CallTimeout):
                await client.cast("kill", name=PLAIN)
        finally:
            await client.close()

    run(loop_factory, main())


# EventSubscriber


@pytest.mark.circusd  # the module's circusd fixture starts one
def test_incr_spawns(loop_factory: LoopFactory, circusd: Circusd) -> None:
    async def main() -> None:
        client, sub = await clients(circusd)
        try:
            before = set(circusd.pids(WEB))
            await call(client, "incr", name=WEB)
            event = await next_event(sub, lambda e: e.action == "spawn")
            assert event.watcher == WEB
            pid = event.data["process_pid"]
            assert isinstance(pid, int) and pid not in before
            assert isinstance(event.data["time"], float)
            assert pid in (await client.call("list", name=WEB))["pids"]
            await call(client, "decr", name=WEB)
        finally:
            await client.close()
            await sub.close()

    run(loop_factory, main())


@pytest.mark.circusd  # the module's circusd fixture starts one
def test_death_reaps(loop_factory: LoopFactory, circusd: Circusd) -> None:
    async def main() -> None:
        client, sub = await clients(circusd)
        try:
            pid = circusd.pids(WEB)[0]
            os.kill(pid, signal.SIGKILL)
            event = await next_event(sub, lambda e: e.action == "reap")
            assert (event.watcher, event.data["process_pid"]) == (WEB, pid)
            assert event.data["exit_code"] == -signal.SIGKILL
            # circusd replaces it.
            spawn = await next_event(sub, lambda e: e.action == "spawn")
            assert spawn.watcher == WEB
        finally:
            await client.close()
            await sub.close()

    run(loop_factory, main())


@pytest.mark.circusd  # the module's circusd fixture starts one
def test_kill_and_decr(loop_factory: LoopFactory, circusd: Circusd) -> None:
    # circusd polls (and so reaps) the processes it kills itself: these give
    # a "kill" event and no "reap".
    async def main() -> None:
        client, sub = await clients(circusd)
        try:
            pid = circusd.pids(PLAIN)[0]
            await client.cast("kill", name=PLAIN, pid=pid)
            event = await next_event(sub, lambda e: e.action == "kill")
            assert (event.watcher, event.data["process_pid"]) == (PLAIN, pid)
            await next_event(sub, lambda e: e.action == "spawn")

            await call(client, "incr", name=PLAIN)
            await next_event(sub, lambda e: e.action == "spawn")
            before = circusd.pids(PLAIN)
            await call(client, "decr", name=PLAIN)
            event = await next_event(sub, lambda e: e.action == "kill")
            assert event.data["process_pid"] in before
            circusd.wait_for(lambda: len(circusd.pids(PLAIN)) == 2, timeout=5)
            assert event.data["process_pid"] not in circusd.pids(PLAIN)
        finally:
            await client.close()
            await sub.close()

    run(loop_factory, main())


def test_malformed_events_skipped(loop_factory: LoopFactory) -> None:
    # Our own PUB socket: circusd never sends garbage, but recv must survive it.
    async def main() -> None:
        context = zmq.asyncio.Context()
        pub = context.socket(zmq.PUB)
        pub.linger = 0
        port = pub.bind_to_random_port("tcp://127.0.0.1")
        sub = EventSubscriber(f"tcp://127.0.0.1:{port}", context=context)
        await sub.start()
        try:
            for _ in range(100):
                await pub.send_multipart([b"watcher.sync.ping", b"{}"])
                try:
                    await asyncio.wait_for(sub.recv(), 0.05)
                    break
                except asyncio.TimeoutError:
                    continue
            for frames in [
                [b"watcher.bad", b"{}"],
                [b"watcher.\xff.spawn", b"{}"],
                [b"watcher.w.spawn", b"{not json"],
                [b"watcher.w.spawn", b"\xff"],
                [b"watcher.w.spawn", b"[1, 2]"],
                [b"watcher.w.spawn", b"42"],
                [b"watcher.w.spawn"],
                [b"watcher.w.spawn", b"{}", b"{}"],
                [b"watcher.w.spawn", b'{"process_pid": 7}'],
            ]:
                await pub.send_multipart(frames)
            event = await next_event(sub, lambda e: e.watcher != "sync", 5.0)
            assert event == Event("w", "spawn", {"process_pid": 7})
        finally:
            await sub.close()
            pub.close()
            context.term()

    run(loop_factory, main())


# Reconnection


def test_circusd_restart(
    loop_factory: LoopFactory, circusd_factory: Callable[..., Circusd]
) -> None:
    daemon = circusd_factory(f"[watcher:w]\ncmd = {SLEEPER}\n")

    async def main() -> None:
        connected = asyncio.Event()
        disconnected = asyncio.Event()
        counts = {"connect": 0, "disconnect": 0}

        def on_connect() -> None:
            counts["connect"] += 1
            connected.set()

        def on_disconnect() -> None:
            counts["disconnect"] += 1
            disconnected.set()

        client = CommandClient(
            daemon.endpoint,
            timeout=0.5,
            on_connect=on_connect,
            on_disconnect=on_disconnect,
        )
        await client.start()
        try:
            await asyncio.wait_for(connected.wait(), 5)
            assert "w" in (await client.call("list"))["watchers"]
            connected.clear()

            await asyncio.to_thread(daemon.kill)
            await asyncio.wait_for(disconnected.wait(), 5)
            with pytest.raises(CallTimeout):
                await client.call("list")

            await asyncio.to_thread(daemon.restart)
            await asyncio.wait_for(connected.wait(), 10)
            assert counts == {"connect": 2, "disconnect": 1}
            client.timeout = 5.0
            assert "w" in (await client.call("list"))["watchers"]
        finally:
            await client.close()

    run(loop_factory, main())


def test_owned_context_closed(loop_factory: LoopFactory) -> None:
    # close() before any traffic, and twice, leaves nothing to warn about.
    async def main() -> None:
        client = CommandClient(f"tcp://127.0.0.1:{free_port()}")
        sub = EventSubscriber(f"tcp://127.0.0.1:{free_port()}")
        await client.start()
        await sub.start()
        for _ in range(2):
            await client.close()
            await sub.close()

    run(loop_factory, main())
