"""The killer against a fake circusd: kills, verification, dry run (no circusd)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from types import ModuleType

import pytest

from circus_watchdog import killer as killer_module
from circus_watchdog.diagnostics import Diagnostics, Why
from circus_watchdog.killer import Killer, is_local_endpoint
from circus_watchdog.metrics import Metrics
from circus_watchdog.registry import Registry
from fake_circusd import FakeCircusd, config


@pytest.fixture(autouse=True)
def quick_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(killer_module, "KILL_CHECK_DELAY", 0.05)


def make(core: ModuleType, watchers: dict[str, list[int]], *, local: bool, **opts: str):  # type: ignore[no-untyped-def]
    cfg = config(**opts)
    registry = Registry(core.HeartbeatTable(cfg.timeout, cfg.tick), cfg, self_pids=[])
    registry.apply_listing(watchers, 0.0, fresh=True)
    fake = FakeCircusd(watchers)
    metrics = Metrics()
    diagnostics = Diagnostics(cfg, metrics, local=local)
    return Killer(fake, registry, metrics, cfg, diagnostics, local=local), fake


async def kill_and_wait(killer: Killer, pid: int, watcher: str, **kw: bool) -> None:
    killer.kill(pid, watcher, Why(3.0, 3.0, 1.0), **kw)
    await asyncio.gather(*killer._tasks)


def test_remote_kill_is_verified_through_circusd(core: ModuleType) -> None:
    killer, fake = make(core, {"web": [10, 11]}, local=False)
    asyncio.run(kill_and_wait(killer, 10, "web", dry_run=False))
    assert killer.metrics.kills["web"] == 1 and killer.metrics.kill_failures == 0
    assert ("list", {"name": "web"}) in fake.calls  # asked circusd, not /proc
    assert killer.registry.killing == []


def test_a_kill_circusd_does_not_carry_out_is_a_failure(core: ModuleType) -> None:
    killer, fake = make(
        core, {"web": [10, 11]}, local=False, watchers_graceful_timeout="0.1"
    )
    fake.kills_work = False  # circusd says ok, the pid stays listed
    asyncio.run(kill_and_wait(killer, 10, "web", dry_run=False))
    assert killer.metrics.kills["web"] == 0 and killer.metrics.kill_failures == 1


def test_local_kill_is_verified_in_proc(core: ModuleType) -> None:
    # A live local process that the fake circusd "kills" without killing it:
    # the local check sees it still runs, where circusd's list would not.
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) as p:
        try:
            killer, fake = make(
                core, {"web": [p.pid]}, local=True, watchers_graceful_timeout="0.1"
            )
            asyncio.run(kill_and_wait(killer, p.pid, "web", dry_run=False))
            assert killer.metrics.kill_failures == 1
            assert ("list", {"name": "web"}) not in fake.calls
        finally:
            p.kill()


def test_local_circusd_with_a_pid_we_cannot_see_asks_circusd(core: ModuleType) -> None:
    # Another pid namespace: the pid does not exist here, so /proc cannot tell.
    killer, fake = make(core, {"web": [2**31 - 7]}, local=True)
    asyncio.run(kill_and_wait(killer, 2**31 - 7, "web", dry_run=False))
    assert killer.metrics.kills["web"] == 1
    assert ("list", {"name": "web"}) in fake.calls


def test_dry_run_kills_nothing_and_leaves_the_pid_watched(core: ModuleType) -> None:
    killer, fake = make(core, {"web": [10]}, local=False)
    asyncio.run(kill_and_wait(killer, 10, "web", dry_run=True))
    assert killer.metrics.would_kill == 1 and not killer.metrics.kills
    assert not [c for c in fake.calls if c[0] == "kill"]
    assert 10 in killer.registry.table and killer.registry.killing == []


def test_a_kill_task_that_fails_is_logged(
    core: ModuleType, caplog: pytest.LogCaptureFixture
) -> None:
    killer, fake = make(core, {"web": [10]}, local=False)

    async def broken(*args: object) -> None:
        raise RuntimeError("a bug in the kill path")

    killer._call_kill = broken  # type: ignore[method-assign]

    async def kill_then_settle() -> None:
        killer.kill(10, "web", Why(3.0, 3.0, 1.0), dry_run=False)
        await asyncio.gather(*killer._tasks, return_exceptions=True)
        await asyncio.sleep(0)  # the done callback runs

    with caplog.at_level("ERROR", "circus.watchdog"):
        asyncio.run(kill_then_settle())
    failed = [r for r in caplog.records if r.getMessage() == "a kill task failed"]
    assert len(failed) == 1 and "a bug in the kill path" in caplog.text
    assert killer.registry.killing == []  # end_kill ran all the same


def test_kill_passes_the_stop_signal_and_graceful_timeout(core: ModuleType) -> None:
    killer, fake = make(
        core,
        {"web": [10]},
        local=False,
        watchers_stop_signal="KILL",
        watchers_graceful_timeout="3",
    )
    asyncio.run(kill_and_wait(killer, 10, "web", dry_run=False))
    assert (
        "kill",
        {
            "name": "web",
            "pid": 10,
            "waiting": True,
            "signum": 9,
            "graceful_timeout": 3.0,
        },
    ) in fake.calls
    assert not [c for c in fake.calls if c[0] == "options"]


def test_a_pid_that_outlives_the_reply_is_checked_until_its_graceful_timeout(
    core: ModuleType,
) -> None:
    # A circusd that answers `kill` at once (no `waiting`) and whose watcher's
    # graceful_timeout (read with `options`) is 0.3 s: the process dies 0.2 s
    # after the reply, its SIGKILL, and the kill is verified, not a failure.
    killer, fake = make(core, {"web": [10, 11]}, local=False)
    fake.kills_work = False
    answer = fake.call

    async def call(command: str, **props: object) -> dict[str, object]:
        if command == "options":
            fake.calls.append((command, props))
            return {"status": "ok", "options": {"graceful_timeout": 0.3}}
        if command == "kill":
            loop = asyncio.get_running_loop()
            loop.call_later(0.2, fake.watchers["web"].remove, 10)
        return await answer(command, **props)  # type: ignore[arg-type]

    fake.call = call  # type: ignore[method-assign]
    asyncio.run(kill_and_wait(killer, 10, "web", dry_run=False))
    assert killer.metrics.kills["web"] == 1 and killer.metrics.kill_failures == 0
    assert ("options", {"name": "web"}) in fake.calls


@pytest.mark.parametrize(
    ("endpoint", "local"),
    [
        ("tcp://127.0.0.1:5555", True),
        ("tcp://127.0.0.2:5555", True),
        ("tcp://[::1]:5555", True),
        ("tcp://localhost:5555", True),
        ("ipc:///run/circus.sock", True),
        ("tcp://10.1.2.3:5555", False),
        ("tcp://circus.example:5555", False),
    ],
)
def test_is_local_endpoint(endpoint: str, local: bool) -> None:
    assert is_local_endpoint(endpoint) is local
