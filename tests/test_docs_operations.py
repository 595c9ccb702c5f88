"""docs/operations.md as an operator would use it: the systemd unit, the
standalone daemon as a circus watcher, and the alert rules.

Snippets are read from the document and run with only what a test must change
(paths of this checkout, free ports, a shorter timing).
"""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from circus_watchdog.config import Config
from support import (
    Circusd,
    command,
    fetch_status,
    free_port,
    free_udp_port,
    http_get,
    wait_for,
    wait_pids,
    worker_cmd,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "operations.md"
DOC_INI = "/etc/circus/circus.ini"
DOC_BIN = "/usr/local/bin/circus-watchdog"
EXIT_BOUND = 10.0  # seconds for the daemon to start answering, or to exit


def section(heading: str) -> str:
    text = DOC.read_text()
    start = text.index(heading + "\n")
    end = re.compile(r"^#{2,3} ", re.M).search(text, start + len(heading))
    return text[start : end.start() if end else len(text)]


def block(heading: str, lang: str) -> str:
    (found,) = re.findall(rf"^```{lang}\n(.*?)^```", section(heading), re.M | re.S)
    return str(found)


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(block("### Under systemd", "ini"))
    return parser


def watcher_ini() -> str:
    return block("### As a circus watcher, from the same circus.ini", "ini")


def set_value(text: str, key: str, value: object) -> str:
    """``key = value`` on the line that sets ``key``; it must be there."""
    new, count = re.subn(rf"^{key} = .*$", f"{key} = {value}", text, flags=re.M)
    assert count == 1, f"{key} is not set once in the snippet"
    return new


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


# -- the systemd unit ----------------------------------------------------------


def test_systemd_unit_commands(tmp_path: Path) -> None:
    """ExecStartPre checks the [watchdog] section of a real circus.ini; ExecStart
    starts the daemon on it, which answers and exits 0 on SIGTERM."""
    service = unit()["Service"]
    pre, start = shlex.split(service["ExecStartPre"]), shlex.split(service["ExecStart"])
    assert pre == [*start, "--check"]
    assert start[0] == DOC_BIN
    assert service["RestartPreventExitStatus"] == "2"  # what a bad option exits

    metrics, udp, ctl, pub = free_port(), free_udp_port(), free_port(), free_port()
    ini = watcher_ini()
    ini = set_value(ini, "endpoint", f"tcp://127.0.0.1:{ctl}")  # nobody there
    ini = set_value(ini, "pubsub_endpoint", f"tcp://127.0.0.1:{pub}")
    ini = set_value(ini, "port", udp)
    ini = set_value(ini, "metrics_port", metrics)
    path = tmp_path / "circus.ini"
    path.write_text(ini)

    def local(argv: list[str]) -> list[str]:
        swapped = [str(path) if arg == DOC_INI else arg for arg in argv[1:]]
        return [*command(), *swapped]

    checked = run(local(pre))
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout == (
        f"circus-watchdog: configuration OK ([watchdog] of {path}); ports free; "
        f"circusd at tcp://127.0.0.1:{ctl} (not contacted)\n"
    )
    # A port taken fails the check, so ExecStartPre stops a restart loop.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", udp))
        busy = run(local(pre))
    assert busy.returncode == 1
    assert busy.stderr == (
        f"circus-watchdog: error: cannot bind the heartbeat socket to ip 127.0.0.1 "
        f"port {udp}: Address already in use\n"
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", metrics))
        taken.listen()
        busy = run(local(pre))
    assert busy.returncode == 1
    assert busy.stderr.startswith(
        f"circus-watchdog: error: metrics_port: cannot listen on 127.0.0.1:{metrics}"
    )
    assert run(local(pre)).returncode == 0  # released: the check holds nothing
    path.write_text(set_value(ini, "max_count", 0))
    refused = run(local(pre))
    assert refused.returncode == 2
    assert refused.stderr.startswith("circus-watchdog: error: invalid max_count ")
    path.write_text(ini)

    log = tmp_path / "watchdog.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(local(start), stdout=out, stderr=subprocess.STDOUT)
    try:
        status = wait_for(lambda: fetch_status(metrics), EXIT_BOUND)
        assert status is not None  # wait_for returns only a truthy value
        assert status["connected"] is False  # no circusd on that endpoint
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(EXIT_BOUND) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(EXIT_BOUND)


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd accepts the unit as written, the binary path aside."""
    text = block("### Under systemd", "ini").replace(DOC_BIN, command()[0])
    if len(command()) > 1:
        pytest.skip("no circus-watchdog script in this environment")
    path = tmp_path / "circus-watchdog.service"
    path.write_text(text)
    out = run(["systemd-analyze", "verify", str(path)])
    assert (out.returncode, out.stderr) == (0, ""), out.stderr


# -- the alert rules ----------------------------------------------------------

# Enough of PromQL for these rules: the functions, aggregations and keywords
# they may use, and the shape of selectors, ranges and label lists.
FUNCTIONS = {"increase", "rate", "absent", "sum", "max", "min", "avg", "count"}
KEYWORDS = {"by", "without", "and", "or", "unless", "on", "ignoring"}
TOKEN = re.compile(
    r"""\s*(?:
        (?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)
      | (?P<number>\d+(?:\.\d+)?)
      | (?P<range>\[\d+[smhdw]\])
      | (?P<matchers>\{\s*[a-zA-Z_]\w*\s*(?:=~|!~|!=|=)\s*"[^"]*"
            (?:\s*,\s*[a-zA-Z_]\w*\s*(?:=~|!~|!=|=)\s*"[^"]*")*\s*\})
      | (?P<op>==|!=|>=|<=|[<>+\-*/])
      | (?P<open>\() | (?P<close>\)) | (?P<comma>,)
    )""",
    re.X,
)


def promql_names(expr: str) -> tuple[set[str], dict[str, set[str]]]:
    """The metric names an expression selects, and the labels it uses on each;
    AssertionError if it is not well-formed."""
    metrics: dict[str, set[str]] = {}
    grouping: set[str] = set()
    depth, pos, last, in_labels = 0, 0, "", False
    while pos < len(expr.rstrip()):
        match = TOKEN.match(expr, pos)
        assert match and match.end() > pos, f"cannot parse {expr[pos:]!r} in {expr!r}"
        kind, text = match.lastgroup, match.group(match.lastgroup or 0)
        pos = match.end()
        if kind == "name" and in_labels:
            grouping.add(text)
        elif kind == "name" and text in KEYWORDS:
            in_labels = text in {"by", "without"}
        elif kind == "name" and text not in FUNCTIONS:
            following = TOKEN.match(expr, pos)
            called = following is not None and following.lastgroup == "open"
            assert not called, f"unknown function {text} in {expr!r}"
            metrics[text] = set()
        elif kind == "matchers":
            assert last in metrics, f"label matchers without a metric in {expr!r}"
            metrics[last] |= set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", text))
        elif kind == "range":
            assert last in metrics or last == "matchers", f"range after {last!r}"
        elif kind == "open":
            depth += 1
        elif kind == "close":
            depth -= 1
            in_labels = False
            assert depth >= 0, f"unbalanced ) in {expr!r}"
        last = text if kind == "name" else str(kind)
    assert depth == 0, f"unbalanced ( in {expr!r}"
    assert metrics, f"no metric in {expr!r}"
    return grouping, metrics


def alert_rules() -> list[dict[str, object]]:
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load(block("### Example alert rules", "yaml"))
    (group,) = doc["groups"]
    rules: list[dict[str, object]] = group["rules"]
    return rules


def test_alert_rules_are_well_formed() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(set(names)) == len(names) >= 5
    listed = set(re.findall(r"`(Watchdog\w+)`", section("### Example alert rules")))
    assert listed == set(names)  # the text explains every rule, and no other
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "annotations", "labels"}
        _, metrics = promql_names(str(rule["expr"]))
        assert all(m == "up" or m.startswith("circus_watchdog_") for m in metrics)
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", str(rule["for"]))
    with pytest.raises(AssertionError):
        promql_names("sum(increase(circus_watchdog_kills_total[10m])")
    with pytest.raises(AssertionError):
        promql_names("frobnicate(circus_watchdog_kills_total)")


def check_alert_metrics(metrics_port: int) -> None:
    """Every metric the rules select is served with the labels they use
    (``up`` is Prometheus's own)."""
    body = http_get(metrics_port, "/metrics")
    assert body is not None
    served: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            served.setdefault(sample.name, set()).update(sample.labels)
    for rule in alert_rules():
        grouping, metrics = promql_names(str(rule["expr"]))
        for name, labels in metrics.items():
            if name == "up":
                continue
            assert name in served, f"{rule['alert']}: {name} is not served"
            assert labels <= served[name], (rule["alert"], name, labels)
            if "by" in str(rule["expr"]):
                assert grouping <= served[name], (rule["alert"], grouping)


# -- the standalone daemon as a circus watcher ----------------------------------


def test_as_circus_watcher(
    circusd_factory: Callable[..., Circusd], tmp_path: Path, core_tag: str
) -> None:
    """circusd starts the watchdog from [watcher:watchdog]; it reads [watchdog]
    of the same file, watches web and api only, kills the hung api process, and
    is itself neither watched nor killed."""
    ini = watcher_ini()
    circus, _, rest = ini.partition("[watcher:watchdog]")
    assert "[circus]" in circus  # the factory writes its own, with free ports
    udp, metrics = free_udp_port(), free_port()
    sections = "[watcher:watchdog]" + rest
    sections = sections.replace(DOC_INI, str(tmp_path / "circusd1" / "circus.ini"))
    sections = sections.replace("cmd = circus-watchdog ", f"cmd = {command()[0]} ")
    sections = set_value(sections, "loop_rate", 0.5)
    sections = set_value(sections, "max_count", 2)
    sections = set_value(sections, "port", udp)
    sections = set_value(sections, "metrics_port", metrics)
    if len(command()) > 1:
        pytest.skip("no circus-watchdog script in this environment")
    circusd = circusd_factory(
        sections
        + f"""
[watcher:web]
cmd = {worker_cmd(udp)}
numprocesses = 2

[watcher:api]
cmd = {worker_cmd(udp, hang_after=1)}
numprocesses = 1

[watcher:other]
cmd = {worker_cmd(udp, silent=True)}
numprocesses = 1
"""
    )
    assert circusd.ini == tmp_path / "circusd1" / "circus.ini"
    pids = wait_pids(circusd, {"watchdog": 1, "web": 2, "api": 1, "other": 1})
    status = circusd.wait_for(lambda: fetch_status(metrics), EXIT_BOUND)
    assert status is not None  # wait_for returns only a truthy value
    assert f" core={core_tag} " in status["version"]

    def monitored() -> dict[int, str]:
        found = fetch_status(metrics)
        assert found is not None
        return {row["pid"]: row["watcher"] for row in found["pids"]}

    (hung,) = pids["api"]
    circusd.wait_for(lambda: monitored().get(hung) == "api", EXIT_BOUND)
    assert {p: w for p, w in monitored().items() if w == "web"} == dict.fromkeys(
        pids["web"], "web"
    )
    # Hangs after 1 s, killed 1 s (loop_rate * max_count) later, plus slack.
    circusd.wait_for(lambda: hung not in circusd.pids("api"), timeout=10)
    time.sleep(1.5)  # more than a timeout: the healthy and the unwatched live on
    watched = monitored()
    assert pids["watchdog"][0] not in watched
    assert pids["other"][0] not in watched
    assert circusd.pids("watchdog") == pids["watchdog"]
    assert circusd.pids("web") == pids["web"]
    assert circusd.pids("other") == pids["other"]
    check_alert_metrics(metrics)


# -- docs/migration.md -----------------------------------------------------------

MIGRATION = DOC.with_name("migration.md")


def migration_block(heading: str, lang: str) -> str:
    text = MIGRATION.read_text()
    start = text.index(heading + "\n")
    end = text.find("\n## ", start)
    found = re.findall(rf"^```{lang}\n(.*?)^```", text[start:end], re.M | re.S)
    assert len(found) == 1, heading
    return str(found[0])


def migrated_ini(tmp_path: Path, *, rename: bool = False) -> Path:
    """circus.ini holding the doc's plugin section (renamed to [watchdog] and
    without `use`, as the doc says to, when ``rename``)."""
    plugin = migration_block("## The one-line change", "ini")
    if rename:
        plugin = plugin.replace("[plugin:watchdog]", "[watchdog]")
        plugin = re.sub(r"^use = .*\n", "", plugin, flags=re.M)
    path = tmp_path / ("renamed.ini" if rename else "circus.ini")
    path.write_text(f"[circus]\n\n{plugin}")  # circus's default endpoints
    return path


def test_migration_plugin_section(tmp_path: Path) -> None:
    """The swapped `use =` names our plugin, and circusd would hand it options
    it accepts; the section renamed to [watchdog] configures the same."""
    from circus.config import get_config
    from circus.util import resolve_name

    from circus_watchdog.circus_ini import read_circus_ini
    from circus_watchdog.plugin import WatchDog

    path = migrated_ini(tmp_path)
    (plugin,) = get_config(str(path))["plugins"]
    assert resolve_name(plugin["use"]) is WatchDog
    ini = read_circus_ini(str(path))
    assert ini.options["watchers_regex"] == "^(web|worker)$"

    def config(*argv: str) -> Config:
        from circus_watchdog.cli import build_parser, config_from_args, ini_from_args

        ns = build_parser().parse_args(list(argv))
        return config_from_args(ns, ini_from_args(ns))

    renamed = migrated_ini(tmp_path, rename=True)
    from_plugin = config("--circus-ini", str(path))
    assert from_plugin == config("--circus-ini", str(renamed), "--section", "watchdog")
    assert from_plugin.loop_rate == 10.0


def test_migration_standalone_command(tmp_path: Path) -> None:
    """The doc's command line, checked (--check) against the doc's section."""
    argv = shlex.split(migration_block("## Running it outside circusd instead", "sh"))
    assert argv[0] == "circus-watchdog" and DOC_INI in argv
    path = migrated_ini(tmp_path)
    local = [*command(), *(str(path) if a == DOC_INI else a for a in argv[1:])]
    out = run([*local, "--check"])
    assert out.returncode == 0, out.stderr
    assert f"configuration OK ([plugin:watchdog] of {path})" in out.stdout
