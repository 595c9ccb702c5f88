"""A fake circusd command client for fast registry, sync and killer tests.

It answers ``list`` (names, and one watcher's pids), ``kill`` (removes the pid
unless told not to) and ``signal`` from a plain dict, and can run a hook in
the middle of a listing, as a real event arriving while ``list`` is in flight.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from circus_watchdog.circusd import CallTimeout, CircusError
from circus_watchdog.config import Config


def config(**options: str) -> Config:
    """A Config from plugin option strings, on made-up endpoints."""
    return Config.from_options(
        options, endpoint="tcp://10.0.0.1:5555", pubsub_endpoint="tcp://10.0.0.1:5556"
    )


class FakeCircusd:
    """Answers commands from ``watchers`` (name -> pids)."""

    def __init__(self, watchers: dict[str, list[int]]) -> None:
        self.watchers = watchers
        self.down = False  # every call times out
        self.kills_work = True
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.during_list: Callable[[], None] | None = None  # runs once, mid-list

    async def call(
        self, command: str, *, timeout: float | None = None, **props: Any
    ) -> dict[str, Any]:
        self.calls.append((command, props))
        if self.down:
            raise CallTimeout(command, "no reply in 5 s")
        if command == "list" and "name" in props:
            if self.during_list is not None:
                hook, self.during_list = self.during_list, None
                hook()
            if props["name"] not in self.watchers:  # as circusd answers
                raise CircusError(command, f"program {props['name']} not found")
            return {"status": "ok", "pids": list(self.watchers[props["name"]])}
        if command == "list":
            return {"status": "ok", "watchers": list(self.watchers)}
        if command == "kill" and self.kills_work:
            pids = self.watchers.get(props["name"], [])
            if props["pid"] in pids:
                pids.remove(props["pid"])
        return {"status": "ok"}
