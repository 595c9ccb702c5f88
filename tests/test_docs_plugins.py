"""Every ``[plugin:...]`` snippet of the README and docs/, run by a real circusd.

An option value circus cannot put on the plugin's command line (an unquoted
space, say) leaves the plugin dead without a word: circus's plugin runner
rejects its arguments before our code is imported, on a stderr circus
discards. So each snippet is checked the way the docs tell operators to
(``circus-watchdog --check --circus-ini FILE --section plugin:NAME``), then
started under circusd, and the plugin must log that it is listening.

A snippet is run as written except for what a test must change: free ports
instead of fixed ones, paths under a temporary directory instead of /run and
/var, and sections of other programs ([watcher:...], [env:...]) left out.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from support import Circusd, command, free_udp_port

pytestmark = pytest.mark.circusd

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
UP_BOUND = 20.0  # seconds for a plugin to start listening
SYSTEM_DIRS = ("/run/", "/var/")


def plugin_snippets() -> list[tuple[str, str]]:
    """(id, text) of every ```ini block that has a [plugin:...] section."""
    found = []
    for doc in DOCS:
        blocks = re.findall(r"^```ini\n(.*?)^```", doc.read_text(), re.M | re.S)
        for index, block in enumerate(blocks):
            if re.search(r"^\[plugin:", block, re.M):
                found.append((f"{doc.relative_to(ROOT)}#{index}", str(block)))
    return found


SNIPPETS = plugin_snippets()


def sections(text: str) -> dict[str, str]:
    """Section name -> its lines (the header included)."""
    parts = re.split(r"^(?=\[)", text, flags=re.M)
    return {p[1 : p.index("]")]: p for p in parts if p.startswith("[")}


def runnable(text: str, tmp_path: Path) -> str:
    """The snippet's plugin and socket sections, on free ports and local paths."""
    kept = []
    for name, body in sections(text).items():
        if not name.startswith(("plugin:", "socket:")):
            continue  # another program's section
        for system in SYSTEM_DIRS:
            local = tmp_path / system.strip("/")
            local.mkdir(exist_ok=True)
            body = body.replace(system, f"{local}/")
        if name.startswith("plugin:"):
            port = re.search(r"^port = (\d+)", body, re.M)
            if port is None:
                body = body.rstrip("\n") + "\nport = 1664\n"  # the default, written
            if port is None or port[1] != "0":
                free = f"port = {free_udp_port()}"
                body = re.sub(r"^port = \d+", free, body, count=1, flags=re.M)
        kept.append(body.rstrip("\n") + "\n")
    return "\n".join(kept)


def test_the_docs_have_plugin_snippets() -> None:
    ids = [snippet_id for snippet_id, _ in SNIPPETS]
    assert any(i.startswith("README.md") for i in ids)
    assert any("operations.md" in i for i in ids)  # diagnostic_command's
    assert any("migration.md" in i for i in ids)


@pytest.mark.parametrize(("snippet_id", "text"), SNIPPETS, ids=[i for i, _ in SNIPPETS])
def test_plugin_snippet_checks_and_runs(
    circusd_factory: Callable[..., Circusd],
    tmp_path: Path,
    snippet_id: str,
    text: str,
) -> None:
    body = runnable(text, tmp_path)
    plugins = [name for name in sections(body) if name.startswith("plugin:")]
    assert plugins, snippet_id

    ini = tmp_path / "check.ini"
    ini.write_text(body)
    for name in plugins:
        checked = subprocess.run(
            [*command(), "--check", "--circus-ini", str(ini), "--section", name],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert checked.returncode == 0, checked.stderr
        warnings = [
            line
            for line in checked.stdout.splitlines()
            if "[WARNING]" in line and "rcvbuf:" not in line  # the host's, not ours
        ]
        assert warnings == [], checked.stdout

    circusd = circusd_factory(body)

    def listening(name: str) -> bool:
        pids = circusd.pids(name)
        log = circusd.log.read_text(errors="replace")
        return any(
            f"circus.watchdog[{pid}] [INFO] circus-watchdog " in line
            and " listening on " in line
            for pid in pids
            for line in log.splitlines()
        )

    for name in plugins:
        circusd.wait_for(lambda: listening(name), timeout=UP_BOUND)  # noqa: B023
