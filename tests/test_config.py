"""Config: defaults of the original plugin, validation, circus.ini and CLI sources."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import shlex
import signal
import textwrap
from pathlib import Path
from typing import Any

import pytest
from circus.config import get_config
from circus.plugins import _str2cfg, get_plugin_cmd
from circus.plugins.watchdog import WatchDog
from circus.watcher import Watcher

import circus_watchdog
from circus_watchdog import circus_ini, values
from circus_watchdog import config as config_module
from circus_watchdog.circus_ini import plugin_options, read_circus_ini
from circus_watchdog.cli import add_arguments, config_from_args, ini_from_args
from circus_watchdog.config import DEFAULT_MSG_REGEX, Config, ConfigError

NAMES = [f.name for f in dataclasses.fields(Config)]
ENDPOINTS = {"endpoint", "pubsub_endpoint"}
BOOLEANS = {"dry_run", "storm_guard", "include_circus"}


def flag(name: str) -> str:
    return "--pubsub" if name == "pubsub_endpoint" else "--" + name.replace("_", "-")


def parse_cli(*argv: str) -> Config:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    ns = parser.parse_args(argv)
    return config_from_args(ns, ini_from_args(ns))


def original(options: dict[str, str]) -> dict[str, Any]:
    """What circus's own WatchDog makes of the same option strings."""
    plugin = WatchDog("tcp://127.0.0.1:1", "tcp://127.0.0.1:2", 1.0, None, **options)
    try:
        return {
            "loop_rate": plugin.loop_rate,
            "max_count": plugin.max_count,
            "ip": plugin.watchdog_ip,
            "port": plugin.watchdog_port,
            "msg_regex": plugin.msg_regex,
            "watchers_regex": plugin.watchers_regex,
            "watchers_stop_signal": plugin.stop_signal,
            "watchers_graceful_timeout": plugin.graceful_timeout,
        }
    finally:
        plugin.loop.close()  # CircusPlugin.__init__ creates an IOLoop


def ours(options: dict[str, str]) -> dict[str, Any]:
    cfg = Config.from_options(options)
    values = {key: getattr(cfg, key) for key in original({})}
    values["watchers_regex"] = cfg.watchers_regex.pattern
    values["msg_regex"] = cfg.msg_regex.pattern
    return values


@pytest.mark.parametrize(
    "options",
    [
        {},
        {
            "loop_rate": "2.5",
            "max_count": "5",
            "ip": "0.0.0.0",
            "port": "9999",
            "watchers_regex": "^(web|api)$",
            "msg_regex": r"^(?P<pid>\d+)$",
            "watchers_stop_signal": "KILL",
            "watchers_graceful_timeout": "7",
        },
        {"watchers_stop_signal": "15", "watchers_graceful_timeout": "0", "port": "9"},
        {"watchers_stop_signal": "SIGHUP", "loop_rate": "1e1"},
    ],
    ids=["defaults", "all-set", "numeric-signal", "signal-name"],
)
def test_same_as_original(options: dict[str, str]) -> None:
    assert ours(options) == original(options)


def test_defaults() -> None:
    cfg = Config.from_options({})
    assert cfg == parse_cli()
    assert (cfg.loop_rate, cfg.max_count, cfg.timeout) == (60.0, 3, 180.0)
    assert cfg.msg_regex.pattern == DEFAULT_MSG_REGEX
    assert cfg.msg_pattern is None
    assert cfg.watchers_regex.pattern == ".*"
    assert (cfg.endpoint, cfg.pubsub_endpoint) == (
        "tcp://127.0.0.1:5555",
        "tcp://127.0.0.1:5556",
    )
    assert (cfg.log_level, cfg.log_output) == ("info", "-")
    assert (cfg.tick, cfg.budget, cfg.rcvbuf) == (1.0, 4096, 8 << 20)
    assert (cfg.resync_interval, cfg.call_timeout) == (300.0, 5.0)
    assert cfg.metrics_port is None
    assert (cfg.dry_run, cfg.storm_guard) == (False, True)
    assert (cfg.max_kill_fraction, cfg.storm_floor) == (0.5, 2)


def test_custom_msg_regex_is_compiled() -> None:
    cfg = Config.from_options({"msg_regex": r"^(?P<pid>\d+)$"})
    assert cfg.msg_regex == re.compile(r"^(?P<pid>\d+)$")  # stored compiled
    assert cfg.msg_pattern is cfg.msg_regex  # the one compiled pattern


def test_max_age_needs_a_timestamp_group() -> None:
    with pytest.raises(ConfigError, match=r"^invalid max_age \(--max-age\): .*'5'$"):
        Config.from_options({"msg_regex": r"^(?P<pid>\d+)$", "max_age": "5"})
    with pytest.raises(ConfigError, match=r"^invalid max_age"):
        parse_cli("--msg-regex", r"^(?P<pid>\d+)$", "--max-age", "5")
    cfg = Config.from_options({"msg_regex": r"^(?P<pid>\d+)$", "max_age": "0"})
    assert cfg.max_age is None
    regex = r"^(?P<pid>\d+) (?P<timestamp>\S+)$"
    assert Config.from_options({"msg_regex": regex, "max_age": "5"}).max_age == 5.0


def test_new_option_defaults() -> None:
    cfg = Config.from_options({})
    assert (cfg.metrics_host, cfg.notify_access) == ("127.0.0.1", "main")
    assert (cfg.include_circus, cfg.batch_delay) == (False, 0.001)
    assert (cfg.diagnostic_command, cfg.diagnostic_dir) == (None, None)
    assert cfg.diagnostic_timeout == 10.0
    assert (cfg.diagnostic_keep, cfg.diagnostic_concurrency) == (100, 2)


def test_new_option_values(tmp_path: Path) -> None:
    target = tmp_path / "made" / "here"
    cfg = Config.from_options(
        {
            "metrics_host": "::",
            "notify_access": "ALL",
            "batch_delay": "0",
            "diagnostic_command": "py-spy dump --pid {pid} --note '{watcher} {{x}}'",
            "diagnostic_dir": str(target),
        }
    )
    assert (cfg.metrics_host, cfg.notify_access, cfg.batch_delay) == ("::", "all", 0)
    assert cfg.diagnostic_command == (
        "py-spy", "dump", "--pid", "{pid}", "--note", "{watcher} {{x}}"
    )  # fmt: skip
    assert cfg.diagnostic_dir == str(target) and target.is_dir()
    assert cfg == parse_cli(
        "--metrics-host", "::", "--notify-access", "all", "--batch-delay", "0",
        "--diagnostic-command", "py-spy dump --pid {pid} --note '{watcher} {{x}}'",
        "--diagnostic-dir", str(target),
    )  # fmt: skip


def test_watchers_regex_uses_match() -> None:
    regex = Config.from_options({"watchers_regex": "web"}).watchers_regex
    assert regex.match("web-1")
    assert not regex.match("my-web")


BAD = [
    ("loop_rate", "abc"),
    ("loop_rate", "0"),
    ("loop_rate", "nan"),
    ("loop_rate", "inf"),
    ("watchers_regex", "("),
    ("msg_regex", "^(?P<pid>.*"),
    ("msg_regex", "^(?P<process>.*);(?P<timestamp>.*)$"),
    ("max_count", "0"),
    ("max_count", "2.5"),
    ("ip", "no-such-host.invalid"),
    ("ip", "256.0.0.1"),
    ("port", "65536"),
    ("port", "-1"),
    ("watchers_stop_signal", "NOPE"),
    ("watchers_stop_signal", "0"),
    ("watchers_stop_signal", "999"),
    ("watchers_graceful_timeout", "-1"),
    ("watchers_graceful_timeout", "soon"),
    ("log_level", "loud"),
    ("log_output", ""),
    ("endpoint", "127.0.0.1:5555"),
    ("endpoint", "bogus://x"),
    ("endpoint", "tcp://nohost"),
    ("endpoint", "tcp://127.0.0.1"),
    ("endpoint", "tcp://127.0.0.1:0"),
    ("endpoint", "tcp://no-such-host.invalid:5555"),
    ("endpoint", "ipc://"),
    ("pubsub_endpoint", ""),
    ("pubsub_endpoint", "udp://127.0.0.1:5556"),
    ("tick", "0"),
    ("tick", "181"),
    ("budget", "0"),
    ("rcvbuf", "8X"),
    ("rcvbuf", "0"),
    ("rcvbuf", "2G"),
    ("rcvbuf", "1.5M"),
    ("resync_interval", "0"),
    ("call_timeout", "-5"),
    ("metrics_port", "70000"),
    ("metrics_port", "metrics"),
    ("dry_run", "maybe"),
    ("storm_guard", "2"),
    ("max_kill_fraction", "0"),
    ("max_kill_fraction", "1.5"),
    ("storm_floor", "-1"),
    ("unix_socket", "relative.sock"),
    ("max_age", "-1"),
    ("grace", "0"),
    ("watcher_timeouts", "web"),
    ("watcher_timeouts", "web=0"),
    ("watcher_timeouts", "(=5"),
    ("diagnostic_signal", "NOPE"),
    ("diagnostic_delay", "0"),
    ("metrics_host", "localhost"),
    ("metrics_host", "1.2.3"),
    ("notify_access", "some"),
    ("include_circus", "maybe"),
    ("batch_delay", "0.006"),
    ("batch_delay", "-0.001"),
    ("diagnostic_command", "py-spy dump --pid {foo}"),
    ("diagnostic_command", "echo {pid!r}"),
    ("diagnostic_command", "echo {"),
    ("diagnostic_command", "echo 'unpaired"),
    ("diagnostic_timeout", "0"),
    ("diagnostic_dir", "/proc/no-such-dir"),
    ("diagnostic_dir", "/etc/hostname/sub"),
    ("diagnostic_keep", "0"),
    ("diagnostic_concurrency", "0"),
]


def test_bad_values_cover_every_option() -> None:
    assert {name for name, _ in BAD} == set(NAMES)


@pytest.mark.parametrize(("name", "value"), BAD, ids=[f"{n}={v}" for n, v in BAD])
def test_bad_value(name: str, value: str) -> None:
    if name in ENDPOINTS:
        with pytest.raises(ConfigError) as plugin_error:
            Config.from_options({}, **{name: value})
    else:
        with pytest.raises(ConfigError) as plugin_error:
            Config.from_options({name: value})
    message = str(plugin_error.value)
    assert message.startswith(f"invalid {name} ({flag(name)}): expected ")
    assert message.endswith(f", got {value!r}")
    if name not in BOOLEANS:  # on the command line they are switches
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_cli(flag(name), value)


def test_unknown_keys_warn() -> None:
    received = {"loop_rat": "1", "loop_rate": "5", "zzz": "1"}
    options, warnings = plugin_options(received, "[plugin:wd]")
    assert options == {"loop_rate": "5"}
    (warning,) = warnings
    assert warning.startswith("ignoring unknown option(s) in [plugin:wd]: ")
    assert "'loop_rat' (did you mean 'loop_rate'?)" in warning
    assert "'zzz'" in warning


def test_from_options_refuses_unknown_keys() -> None:
    with pytest.raises(ConfigError, match=r"'loop_rat' \(did you mean 'loop_rate'"):
        Config.from_options({"loop_rat": "1"})


def test_endpoints_are_not_plugin_options() -> None:
    # circus hands a plugin its endpoints as arguments, never as options.
    options, warnings = plugin_options({"endpoint": "tcp://127.0.0.1:1"}, "[p]")
    assert options == {}
    assert "'endpoint'" in warnings[0]


def test_circus_keys_are_silent() -> None:
    received = {
        "use": "circus_watchdog.plugin.WatchDog",
        "name": "plugin:watchdog",
        "__name__": "plugin:watchdog",
        "priority": "1",
        "active": "true",
        "numprocesses": "1",
        "stdout_stream.class": "StdoutStream",
        "rlimit_nofile": "4096",
    }
    assert plugin_options(received, "[p]") == ({}, [])


def test_empty_value_one_warning() -> None:
    # What circus's _str2cfg makes of "loop_rate =" before "max_count = 5".
    options, warnings = plugin_options({"": "max_count:5"}, "[plugin:wd]")
    assert options == {}
    assert warnings == [
        "an empty option in [plugin:wd] made circus drop the option after it "
        "(max_count): delete empty options"
    ]


def test_circus_keys_cover_watcher_arguments() -> None:
    params = set(inspect.signature(Watcher.__init__).parameters) - {"self", "options"}
    assert params <= circus_ini.CIRCUS_KEYS


def test_tick() -> None:
    assert Config.from_options({"loop_rate": "60"}).tick == 1.0
    assert Config.from_options({"loop_rate": "5"}).tick == 0.5
    cfg = Config.from_options({"loop_rate": "2", "max_count": "1", "tick": "2"})
    assert cfg.tick == cfg.timeout == 2.0
    with pytest.raises(ConfigError, match=r"tick \(--tick\).*\(2\), got '2.5'"):
        Config.from_options({"loop_rate": "2", "max_count": "1", "tick": "2.5"})


@pytest.mark.parametrize(
    ("value", "size"),
    [("4096", 4096), ("512K", 512 << 10), ("8M", 8 << 20), ("8m", 8 << 20)]
    + [("1G", 1 << 30), ("1g", 1 << 30)],
)
def test_rcvbuf_suffixes(value: str, size: int) -> None:
    assert Config.from_options({"rcvbuf": value}).rcvbuf == size


@pytest.mark.parametrize(("value", "port"), [("", None), ("0", None), ("91", 91)])
def test_metrics_port(value: str, port: int | None) -> None:
    assert Config.from_options({"metrics_port": value}).metrics_port == port


@pytest.mark.parametrize(
    ("value", "expected"),
    [(v, True) for v in ("true", "Yes", "ON", "1")]
    + [(v, False) for v in ("false", "No", "off", "0")],
)
@pytest.mark.parametrize("name", sorted(BOOLEANS))
def test_booleans(name: str, value: str, expected: bool) -> None:
    assert getattr(Config.from_options({name: value}), name) is expected


@pytest.mark.parametrize("name", sorted(BOOLEANS))
def test_boolean_flags(name: str) -> None:
    assert getattr(parse_cli(flag(name)), name) is True
    assert getattr(parse_cli("--no-" + flag(name)[2:]), name) is False


def test_optional_overrides_accept_empty() -> None:
    cfg = Config.from_options(
        {"watchers_stop_signal": "", "watchers_graceful_timeout": ""}
    )
    assert cfg.watchers_stop_signal is cfg.watchers_graceful_timeout is None


def test_log_level_is_case_insensitive() -> None:
    assert Config.from_options({"log_level": "DEBUG"}).log_level == "debug"


def test_every_flag_has_help_with_default() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    actions = {a.dest: a for a in parser._actions}
    for name in NAMES:
        assert flag(name) in actions[name].option_strings
        assert "(default: " in (actions[name].help or "")
        assert actions[name].default is None  # so given flags can be told apart
    assert "--circus-ini" in actions["circus_ini"].option_strings
    assert actions["section"].default is None  # plugin:watchdog, with --circus-ini
    with pytest.raises(ConfigError, match=r"^invalid --section 'x': needs --circus"):
        parse_cli("--section", "x")


INI = r"""
[circus]
endpoint = tcp://127.0.0.1:6555
pubsub_endpoint = tcp://127.0.0.1:6556

[plugin:watchdog]
use = circus.plugins.watchdog.WatchDog
priority = 2
watchers_regex = "^(web|api)$"
msg_regex = "^(?P<pid>\d+) (?P<timestamp>\S+)$"
loop_rate = 5
dry_run = yes
storm_guard = no

[plugin:other]
use = circus.plugins.watchdog.WatchDog
"""

PLAIN_OPTIONS = {
    "watchers_regex": "^(web|api)$",
    "msg_regex": r"^(?P<pid>\d+) (?P<timestamp>\S+)$",
    "loop_rate": "5",
    "dry_run": "yes",
    "storm_guard": "no",
}


def write_ini(tmp_path: Path, text: str) -> str:
    path = tmp_path / "circus.ini"
    path.write_text(textwrap.dedent(text))
    return str(path)


def what_circus_passes(path: str, section: str = "plugin:watchdog") -> dict[str, Any]:
    """The endpoints and options circusd puts on the plugin's command line."""
    circus_cfg = get_config(path)
    (plugin,) = (p for p in circus_cfg["plugins"] if p["name"] == section)
    cmd = get_plugin_cmd(
        dict(plugin), circus_cfg["endpoint"], circus_cfg["pubsub_endpoint"], 5.0, None
    )
    argv = shlex.split(cmd)  # as the plugin's watcher does (circus/process.py)
    return {
        "endpoint": argv[argv.index("--endpoint") + 1],
        "pubsub_endpoint": argv[argv.index("--pubsub") + 1],
        "options": _str2cfg(argv[argv.index("--config") + 1]),
    }


def test_ini_matches_what_circus_passes(tmp_path: Path) -> None:
    path = write_ini(tmp_path, INI)
    passed = what_circus_passes(path)
    ini = read_circus_ini(path)
    assert ini._asdict() == {
        **passed,
        "options": plugin_options(passed["options"], "")[0],
        "source": f"[plugin:watchdog] of {path}",
        "warnings": (),
    }
    assert ini.options["watchers_regex"] == "^(web|api)$"  # quotes gone
    assert ini.options["msg_regex"] == PLAIN_OPTIONS["msg_regex"]  # "\d" kept

    from_ini = parse_cli("--circus-ini", path)
    assert from_ini == Config.from_options(
        PLAIN_OPTIONS,
        endpoint="tcp://127.0.0.1:6555",
        pubsub_endpoint="tcp://127.0.0.1:6556",
    )
    assert from_ini == Config.from_options(
        plugin_options(passed["options"], "")[0],
        endpoint=passed["endpoint"],
        pubsub_endpoint=passed["pubsub_endpoint"],
    )
    assert ours(ini.options) == original(ini.options)


def test_ini_unquoted_backslash(tmp_path: Path) -> None:
    path = write_ini(
        tmp_path,
        r"""
        [plugin:watchdog]
        use = circus.plugins.watchdog.WatchDog
        msg_regex = ^(?P<pid>\d+);(?P<timestamp>.*)$
        """,
    )
    ini = read_circus_ini(path)
    # Faithful to circus, which hands the original plugin "d+", not "\d+".
    assert ini.options == plugin_options(what_circus_passes(path)["options"], "")[0]
    assert ini.options["msg_regex"] == "^(?P<pid>d+);(?P<timestamp>.*)$"
    (warning,) = ini.warnings
    assert "msg_regex" in warning
    assert "double-quote" in warning


def test_ini_empty_value_swallows_next(tmp_path: Path) -> None:
    path = write_ini(
        tmp_path,
        """
        [plugin:watchdog]
        use = circus.plugins.watchdog.WatchDog
        loop_rate =
        max_count = 5
        """,
    )
    ini = read_circus_ini(path)
    assert what_circus_passes(path)["options"][""] == "max_count:5"
    assert ini.options == {}
    assert ini.warnings == (  # one warning, not a second one for the key ''
        f"an empty option in [plugin:watchdog] of {path} made circus drop the "
        "option after it (max_count): delete empty options",
    )


def test_ini_unquoted_space_is_an_error(tmp_path: Path) -> None:
    path = write_ini(
        tmp_path,
        r"""
        [plugin:watchdog]
        use = circus.plugins.watchdog.WatchDog
        msg_regex = ^(?P<pid>\d+) (?P<timestamp>.*)$
        """,
    )
    with pytest.raises(ConfigError, match=r"invalid msg_regex \(--msg-regex\) in "):
        read_circus_ini(path)


def test_ini_defaults_endpoints(tmp_path: Path) -> None:
    path = write_ini(tmp_path, "[plugin:watchdog]\nloop_rate = 5\n")
    cfg = parse_cli("--circus-ini", path)
    assert (cfg.endpoint, cfg.pubsub_endpoint, cfg.loop_rate) == (
        "tcp://127.0.0.1:5555",
        "tcp://127.0.0.1:5556",
        5.0,
    )


def test_flags_override_ini(tmp_path: Path) -> None:
    path = write_ini(tmp_path, INI)
    cfg = parse_cli(
        "--circus-ini",
        path,
        "--loop-rate",
        "7",
        "--storm-guard",
        "--pubsub",
        "ipc:///x",
    )
    assert cfg.loop_rate == 7.0
    assert cfg.storm_guard is True
    assert cfg.pubsub_endpoint == "ipc:///x"
    assert cfg.endpoint == "tcp://127.0.0.1:6555"  # from the file
    assert cfg.watchers_regex.pattern == "^(web|api)$"  # from the file
    assert cfg.dry_run is True  # from the file


def test_other_section(tmp_path: Path) -> None:
    path = write_ini(tmp_path, INI)
    assert parse_cli("--circus-ini", path, "--section", "plugin:other").loop_rate == 60


def test_missing_section(tmp_path: Path) -> None:
    path = write_ini(tmp_path, INI)
    with pytest.raises(ConfigError) as error:
        parse_cli("--circus-ini", path, "--section", "plugin:nope")
    message = str(error.value)
    assert message.startswith("invalid --section: ")
    # Every section the file has, as the docs say, not only plugin ones.
    assert "(present: [circus], [plugin:watchdog], [plugin:other])" in message
    assert message.endswith("got 'plugin:nope'")


def test_missing_ini(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid --circus-ini: "):
        parse_cli("--circus-ini", str(tmp_path / "nope.ini"))


def test_ini_bad_value_names_option(tmp_path: Path) -> None:
    path = write_ini(tmp_path, "[plugin:watchdog]\nmax_count = many\n")
    with pytest.raises(ConfigError, match=r"invalid max_count \(--max-count\)"):
        parse_cli("--circus-ini", path)


@pytest.mark.parametrize(
    "endpoint",
    ["tcp://127.0.0.1:5555", "tcp://[::1]:5555", "tcp://localhost:1", "ipc:///x"],
)
def test_usable_endpoints(endpoint: str) -> None:
    cfg = Config.from_options({}, endpoint=endpoint, pubsub_endpoint=endpoint)
    assert cfg.endpoint == cfg.pubsub_endpoint == endpoint


WATCHDOG_SECTION = r"""
[circus]
endpoint = tcp://127.0.0.1:6555

[env]
RATE = 4

[watcher:watchdog]
cmd = circus-watchdog --circus-ini this.ini --section watchdog

[watchdog]
watchers_regex = "^(web|api)$"
msg_regex = ^(?P<pid>\d+);(?P<timestamp>.*)$
loop_rate = $(circus.env.rate)
dry_run = yes
"""


def test_any_section_is_read_as_written(tmp_path: Path) -> None:
    path = write_ini(tmp_path, WATCHDOG_SECTION)
    ini = read_circus_ini(path, "watchdog")
    cfg = parse_cli("--circus-ini", path, "--section", "watchdog")
    assert ini.warnings == ()  # nothing lost in transit, no unknown keys
    # Enclosing quotes removed as in a plugin section, but no command line in
    # between: an unquoted backslash is kept, [env] is substituted.
    assert ini.options == {
        "watchers_regex": "^(web|api)$",
        "msg_regex": r"^(?P<pid>\d+);(?P<timestamp>.*)$",
        "loop_rate": "4",
        "dry_run": "yes",
    }
    assert (ini.endpoint, ini.source) == (
        "tcp://127.0.0.1:6555",
        f"[watchdog] of {path}",
    )
    assert (cfg.loop_rate, cfg.dry_run, cfg.endpoint) == (4.0, True, ini.endpoint)


def test_plain_section_errors_name_the_option(tmp_path: Path) -> None:
    spaced = r'"^(?P<pid>\d+) (?P<timestamp>\S+)$"'
    path = write_ini(tmp_path, f"[watchdog]\nmsg_regex = {spaced}\n")
    ini = read_circus_ini(path, "watchdog")
    assert ini.options == {"msg_regex": spaced[1:-1]}  # what a plugin would get
    path = write_ini(tmp_path, "[watchdog]\nmax_count = 0\n[other]\nx = 1\n")
    with pytest.raises(ConfigError, match=r"^invalid max_count \(--max-count\)"):
        parse_cli("--circus-ini", path, "--section", "watchdog")
    with pytest.raises(ConfigError) as error:
        parse_cli("--circus-ini", path, "--section", "nope")
    assert str(error.value) == (
        f"invalid --section: expected a section of {path!r} "
        "(present: [watchdog], [other]), got 'nope'"
    )


def test_config_module_does_not_read_circus_ini() -> None:
    # Only circus_ini.py imports circus's reader and its private helpers; the
    # option table needs nothing from circus but what its parsers do.
    tree = ast.parse(Path(config_module.__file__).read_text())
    imported = {
        (n.level, n.module, *(a.name for a in n.names))
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom)
    }
    assert not any(module and module.startswith("circus") for _, module, *_ in imported)
    assert (1, None, "values") in imported  # the check sees the imports


def _package_imports() -> dict[str, set[str]]:
    """Each module of the package, and the package modules it imports (even
    under TYPE_CHECKING or inside a function)."""
    src = Path(circus_watchdog.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in src.glob("*.py"):
        edges = graph.setdefault(path.stem, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    edges.add(node.module.split(".")[0])
                else:
                    edges.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom | ast.Import):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                names += [a.name for a in getattr(node, "names", [])]
                for name in names:
                    if name.startswith("circus_watchdog."):
                        edges.add(name.split(".")[1])
    return graph


def test_no_import_cycle() -> None:
    graph = _package_imports()
    assert {"config", "values", "circus_ini", "cli"} <= set(graph)
    assert graph["config"] == {"values"}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, " -> ".join((*path, module))
        if module in done:
            return
        for imported in sorted(graph.get(module, ())):
            visit(imported, (*path, module))
        done.add(module)

    for module in sorted(graph):
        visit(module, ())


def test_seconds() -> None:
    assert values.seconds("2.5") == 2.5
    for bad in ("0", "-1", "nan", "inf", "soon", ""):
        with pytest.raises(ValueError, match=r"^a number of seconds > 0$"):
            values.seconds(bad)


def test_help_reads_in_option_table_order() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    titles = [g.title for g in parser._action_groups][2:]  # after argparse's own
    flags = [a.dest for g in parser._action_groups[2:] for a in g._group_actions]
    assert flags == [*NAMES, "circus_ini", "section"]
    assert titles == [o.group for o in config_module.OPTIONS.values() if o.group] + [
        "circus.ini"
    ]


@pytest.mark.parametrize("section", ["watcher:web", "circus", "env", "socket:s"])
def test_sections_circus_reads_are_refused(tmp_path: Path, section: str) -> None:
    path = write_ini(tmp_path, "[watcher:web]\ncmd = sleep 1\n[socket:s]\n")
    with pytest.raises(ConfigError) as error:
        parse_cli("--circus-ini", path, "--section", section)
    message = str(error.value)
    assert message.startswith("invalid --section: expected a [plugin:NAME] section")
    assert message.endswith(f"got {section!r}")


def test_ip_accepts_a_host_name_like_the_original() -> None:
    assert Config.from_options({"ip": "localhost"}).ip == "127.0.0.1"
    assert Config.from_options({"ip": "::1"}).ip == "::1"


def test_issue5_options() -> None:
    c = Config.from_options(
        {
            "unix_socket": "/run/wd.sock",
            "port": "0",
            "max_age": "30",
            "grace": "20",
            "watcher_timeouts": "^batch=600, web.*=5",
            "diagnostic_signal": "USR1",
            "diagnostic_delay": "1.5",
        }
    )
    assert (c.unix_socket, c.port, c.max_age, c.grace) == ("/run/wd.sock", 0, 30, 20)
    assert c.timeout_of("batch-1") == 600 and c.timeout_of("web2") == 5
    assert c.timeout_of("other") == c.timeout == 180
    assert c.diagnostic_signal == signal.SIGUSR1 and c.diagnostic_delay == 1.5
    defaults = Config.from_options({})
    assert defaults.unix_socket is None and defaults.max_age is None
    assert defaults.grace is None and defaults.watcher_timeouts == ()
    assert defaults.diagnostic_signal is None


def test_port_0_needs_a_unix_socket() -> None:
    with pytest.raises(ConfigError, match="port.*unix_socket"):
        Config.from_options({"port": "0"})


DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def test_doc_option_table_lists_every_option() -> None:
    """docs/configuration.md's table: one row per option, its flag, its default."""
    text = DOC.read_text()
    table = text[text.index("## Options\n") : text.index("## Logging\n")]
    rows = re.findall(r"^\| (.+?) \| `(--[\w-]+)`[^|]* \| (.+?) \|", table, re.M)
    by_flag = {row_flag: (name, default) for name, row_flag, default in rows}
    assert len(by_flag) == len(rows) == len(NAMES)
    assert list(by_flag) == [flag(name) for name in NAMES]  # --help's order
    for name in NAMES:
        option = config_module.OPTIONS[name]
        row_name, default = by_flag[flag(name)]
        assert row_name == ("(circus passes it)" if name in ENDPOINTS else f"`{name}`")
        if option.default and not option.shown_default:
            assert default == f"`{option.default}`", name


def test_plugin_docstring_lists_every_option_with_its_default() -> None:
    from circus_watchdog.plugin import WatchDog as Ours  # noqa: PLC0415

    doc = " ".join((Ours.__doc__ or "").split())  # one line: wrapped items join
    listed = dict(re.findall(r"- \*\*(\w+)\*\* -- .*?\(default: (.+?)\)(?= -|$)", doc))
    plugin = {n: o for n, o in config_module.OPTIONS.items() if o.plugin}
    assert sorted(listed) == sorted(plugin)  # every option, once
    for name, option in plugin.items():
        shown = option.shown_default or f"``{option.default}``"
        assert listed[name] == shown, name
