"""sd_notify clients that connect once work from circusd's first second.

docs/security.md's Unix-socket example, run on a real circusd: its watchers
use the ``sdnotify`` package unchanged (it connects ``NOTIFY_SOCKET`` once, at
construction, and silently drops every message if nothing was bound there).
circusd binds the socket (``[socket:watchdog]``) before it starts anything and
the plugin inherits it (``use_sockets = True``): nothing is killed. The same
ini without the socket section kills every such process once (the control).
"""

from __future__ import annotations

import re
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path

from support import Circusd, fetch_metrics, free_port, metric, wait_pids

DOC = Path(__file__).resolve().parent.parent / "docs" / "security.md"
LOOP_RATE = 0.5  # seconds (the doc's 5 would make a slow test)
MAX_COUNT = 2
TIMEOUT = LOOP_RATE * MAX_COUNT
WATCH = 4 * TIMEOUT  # seconds watched: the start-up grace, then 2 timeouts and more
PROCESSES = 4  # the doc's numprocesses

# The client, unchanged; bounded so that it ends even if circusd dies first.
WORKER = f"""\
import time
import sdnotify

n = sdnotify.SystemdNotifier()
for _ in range(600):
    n.notify("WATCHDOG=1")
    time.sleep({LOOP_RATE / 4})
"""


def doc_ini(tmp_path: Path, metrics_port: int, *, socket_section: bool) -> str:
    """The doc's example with a temporary path, this test's worker, a short
    loop_rate and a metrics port, and no storm guard (which would hold the
    kills of all 4 silent processes for 10 timeouts: the test is stricter
    without it); without circusd's socket if asked."""
    doc = DOC.read_text()
    blocks = [b.split("```", 1)[0] for b in doc.split("```ini\n")[1:]]
    (ini,) = [b for b in blocks if "[socket:watchdog]" in b]
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    ini = ini.replace("/run/circus-watchdog.sock", str(tmp_path / "wd.sock"))
    ini = ini.replace("cmd = /srv/web/bin/server", f"cmd = {sys.executable} {worker}")
    ini = re.sub(
        r"^loop_rate = 5$",
        f"loop_rate = {LOOP_RATE}\nmax_count = {MAX_COUNT}\n"
        f"metrics_port = {metrics_port}\nstorm_guard = false",
        ini,
        flags=re.MULTILINE,
    )
    assert f"metrics_port = {metrics_port}" in ini
    if not socket_section:
        ini = re.sub(r"\[socket:watchdog\]\n(.+\n)+", "", ini)
        ini = re.sub(r"^use_sockets = .*\n", "", ini, flags=re.MULTILINE)
        assert "socket:" not in ini and "use_sockets" not in ini
    return ini


def start(
    circusd_factory: Callable[..., Circusd], tmp_path: Path, *, socket_section: bool
) -> tuple[Circusd, int, list[int]]:
    """circusd on the doc's ini; its metrics port and the web pids once up."""
    port = free_port()
    circusd = circusd_factory(doc_ini(tmp_path, port, socket_section=socket_section))
    first = wait_pids(circusd, {"web": PROCESSES})["web"]
    return circusd, port, first


def watched(circusd: Circusd, port: int) -> tuple[list[int], dict[str, float]]:
    """The web pids and the metrics WATCH seconds after the plugin serves."""
    circusd.wait_for(lambda: fetch_metrics(port), timeout=15)
    time.sleep(WATCH)
    series = fetch_metrics(port)
    assert series is not None
    return circusd.pids("web"), series


def test_doc_example_kills_nothing_at_start_up(
    circusd_factory: Callable[..., Circusd], tmp_path: Path
) -> None:
    """Nothing killed after circusd starts, nor after the plugin restarts
    (the socket, and the clients' connections to it, stay circusd's)."""
    circusd, port, first = start(circusd_factory, tmp_path, socket_section=True)
    # circusd's socket, with the section's umask = 0: any user may send.
    assert stat.S_IMODE((tmp_path / "wd.sock").stat().st_mode) == 0o777

    def check_nothing_killed() -> None:
        later, series = watched(circusd, port)
        assert later == first
        assert metric(series, "kills_total", watcher="web") == 0
        assert metric(series, "monitored_pids") == PROCESSES
        assert metric(series, "heartbeats_total") > 0

    check_nothing_killed()
    (plugin,) = circusd.pids("plugin:watchdog")
    circusd.call("restart", name="plugin:watchdog")
    circusd.wait_for(lambda: circusd.pids("plugin:watchdog") != [plugin], 10)
    check_nothing_killed()


def test_without_circusd_socket_each_process_is_killed_once(
    circusd_factory: Callable[..., Circusd], tmp_path: Path
) -> None:
    """The control: the plugin binds after the watchers connected (and gave up)."""
    circusd, port, first = start(circusd_factory, tmp_path, socket_section=False)
    later, series = watched(circusd, port)
    assert not set(first) & set(later)
    assert metric(series, "kills_total", watcher="web") == PROCESSES
