"""Reading circus's configuration: a circus.ini as circusd does, and the keys
circus itself puts in a plugin's options.

The only module that uses circus's configuration reader and its private
plugin-command helpers (``_cfg2str``/``_str2cfg``), and the one that knows
circus's own section keys: a circus upgrade that changes them breaks this
module alone. It warns through the ``warnings`` it returns, not a logger, so
that the caller logs them once its log is set up (where the operator looks).
"""

from __future__ import annotations

import configparser
import os
import shlex
from collections.abc import Mapping
from typing import Any, NamedTuple

from circus.config import get_config, read_config
from circus.plugins import _cfg2str, _str2cfg

from .config import PLUGIN_OPTIONS, ConfigError, describe_option, did_you_mean

__all__ = (
    "DEFAULT_SECTION",
    "CircusIni",
    "plugin_options",
    "read_circus_ini",
)

DEFAULT_SECTION = "plugin:watchdog"

# Keys circus itself reads from a [plugin:NAME] section, so the original plugin
# never sees them as its own: `use` (plugins.get_plugin_cmd), `name`, `priority`
# and `__name__` (added or cast by circus.config.get_config and StrictConfigParser),
# `active` (CircusPlugin), and every argument of circus.watcher.Watcher, because
# circusd runs the plugin as a watcher built from the whole section.
CIRCUS_KEYS = frozenset(
    {
        "__name__", "use", "name", "active", "priority", "cmd", "args",
        "numprocesses", "warmup_delay", "working_dir", "shell", "shell_args", "uid",
        "gid", "max_retry", "send_hup", "stop_signal", "stop_children", "env",
        "graceful_timeout", "prereload_fn", "rlimits", "executable", "stdout_stream",
        "stderr_stream", "loop", "singleton", "use_sockets", "copy_env", "copy_path",
        "max_age", "max_age_variance", "hooks", "respawn", "autostart", "on_demand",
        "virtualenv", "virtualenv_py_ver", "stdin_socket", "close_child_stdin",
        "close_child_stdout", "close_child_stderr", "check_flapping",
    }
)  # fmt: skip
_CIRCUS_KEY_PREFIXES = ("stdout_stream.", "stderr_stream.", "hooks.", "rlimit_")
# Sections circus reads for itself: never a watchdog's options.
_CIRCUS_SECTIONS = ("circus", "env")
_CIRCUS_SECTION_PREFIXES = ("watcher:", "socket:", "env:")


class CircusIni(NamedTuple):
    """Our options from one section of a circus.ini, and circusd's endpoints."""

    options: dict[str, str]
    endpoint: str
    pubsub_endpoint: str
    source: str = ""  # "[section] of path", for messages
    warnings: tuple[str, ...] = ()  # for the caller to log once logging is set up


def plugin_options(
    received: Mapping[str, Any], source: str
) -> tuple[dict[str, str], list[str]]:
    """Our options among the keys of a section, and a warning for the others.

    circus's own keys are dropped silently; an unknown key is ignored with a
    warning (with a did-you-mean), as the original ignores it, so a circus.ini
    that works with it keeps working.
    """
    warnings = []
    swallowed = received.get("")  # what circus made of an empty value
    if swallowed is not None:
        warnings.append(
            f"an empty option in {source} made circus drop the option after it "
            f"({str(swallowed).partition(':')[0]}): delete empty options"
        )
    unknown = sorted(
        key
        for key in received
        if key
        and key not in PLUGIN_OPTIONS
        and key not in CIRCUS_KEYS
        and not key.startswith(_CIRCUS_KEY_PREFIXES)
    )
    if unknown:
        warnings.append(
            f"ignoring unknown option(s) in {source}: "
            + ", ".join(map(did_you_mean, unknown))
        )
    options = {k: str(v) for k, v in received.items() if k in PLUGIN_OPTIONS}
    return options, warnings


def read_circus_ini(path: str, section: str = DEFAULT_SECTION) -> CircusIni:
    """Read a circus.ini as circusd does; a plugin section as the plugin receives it."""
    if section in _CIRCUS_SECTIONS or section.startswith(_CIRCUS_SECTION_PREFIXES):
        raise ConfigError(
            "invalid --section: expected a [plugin:NAME] section or a section of "
            "the watchdog's own such as [watchdog], not one that circus reads for "
            f"itself, got {section!r}"
        )
    try:
        # circus's own reader: includes, [env] and $(circus.env.*) substitution.
        circus_cfg = get_config(path)
        cfg, _ = read_config(path)
    except (OSError, configparser.Error, ValueError) as exc:
        raise ConfigError(
            f"invalid --circus-ini: expected a readable circus.ini, got {path!r} "
            f"({str(exc).strip()})"
        ) from None
    if not cfg.has_section(section):
        present = ", ".join(f"[{name}]" for name in cfg.sections()) or "none"
        raise ConfigError(
            f"invalid --section: expected a section of {path!r} (present: "
            f"{present}), got {section!r}"
        )
    source = f"[{section}] of {path}"
    warnings: list[str] = []
    if section.startswith("plugin:"):
        (plugin,) = (p for p in circus_cfg["plugins"] if p["name"] == section)
        received = _as_plugin_receives(plugin, source, warnings)
    else:
        env = dict(os.environ)
        if cfg.has_section("env"):
            env.update(cfg.items("env"))
        cfg.set_env(env)  # as circusd substitutes $(circus.env.*)
        received = {
            key: _strip_quotes(str(value))
            for key, value in cfg.items(section)
            if key != "__name__"  # added by circus's StrictConfigParser
        }
    options, unknown = plugin_options(received, source)
    return CircusIni(
        options,
        circus_cfg["endpoint"],
        circus_cfg["pubsub_endpoint"],
        source,
        tuple(warnings + unknown),
    )


def _strip_quotes(value: str) -> str:
    """A value of a plain section: one pair of enclosing quotes removed, no more.

    No command line lies between the file and the watchdog, so backslashes and
    spaces are kept; the quotes a [plugin:NAME] section needs around such
    values are removed, so the section can be renamed without other changes.
    """
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def _unquote(key: str, value: Any, source: str) -> str:
    """One value with shell quoting removed, as the plugin's command line does."""
    try:
        words = shlex.split(f"{key}:{value}")
    except ValueError:  # an unpaired quote
        words = []
    if len(words) != 1:
        raise ConfigError(
            f"invalid {describe_option(key)} in {source}: expected a value that "
            "circus can put on the plugin's command line (double-quote values "
            f"with spaces, pair the quotes), got {value!r}"
        )
    return words[0].partition(":")[2].strip()


def _as_plugin_receives(
    plugin: Mapping[str, Any], source: str, warnings: list[str]
) -> dict[str, str]:
    """Pass a section through circus's plugin command line, as circusd does.

    circus.plugins.get_plugin_cmd drops `use` and joins the rest into one
    `--config key:value:::...` word of a command line that the plugin's watcher
    splits with shlex.split (circus/process.py): quotes are removed, unquoted
    backslashes are dropped and unquoted whitespace splits the word, which
    breaks the plugin's own argument parsing (a ConfigError here).
    """
    section = {key: value for key, value in plugin.items() if key != "use"}
    written: dict[str, str] = {}
    for key, value in section.items():
        written[key] = _unquote(key, value, source)
        text = str(value)
        if "\\" in text and not any(q in text for q in "\"'") and written[key] != text:
            warnings.append(
                f"{key} in {source} reaches the plugin as {written[key]!r}: circus "
                "drops unquoted backslashes; double-quote the value to keep them"
            )
    if not section:
        return {}
    (word,) = shlex.split(_cfg2str(section))
    received: dict[str, str] = _str2cfg(word)
    # An empty value and the option it swallows get plugin_options' warning.
    swallowed = received.get("", "").partition(":")[0]
    changed = sorted(
        key
        for key in written
        if received.get(key) != written[key] and written[key] and key != swallowed
    )
    if changed:
        warnings.append(
            f"circus does not pass {', '.join(changed)} of {source} to the plugin "
            "as written: ':::' splits a value"
        )
    return received
