"""Reading a circus.ini as circusd does, for the standalone daemon's --circus-ini.

The only module that uses circus's configuration reader and its private
plugin-command helpers (``_cfg2str``/``_str2cfg``): a circus upgrade that
changes them breaks this module alone.
"""

from __future__ import annotations

import argparse
import configparser
import logging
import os
import shlex
from collections.abc import Mapping
from typing import Any, NamedTuple

from circus.config import get_config, read_config
from circus.plugins import _cfg2str, _str2cfg

from . import config
from .config import Config, ConfigError, describe_option

__all__ = (
    "DEFAULT_SECTION",
    "CircusIni",
    "add_arguments",
    "config_from_args",
    "read_circus_ini",
)

logger = logging.getLogger(__name__)

DEFAULT_SECTION = "plugin:watchdog"


class CircusIni(NamedTuple):
    """The options of one section of a circus.ini, and circusd's endpoints."""

    options: dict[str, str]
    endpoint: str
    pubsub_endpoint: str
    source: str = ""  # "[section] of path", for messages


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add a flag for every option, plus --circus-ini and --section."""
    config.add_arguments(parser)
    parser.add_argument(
        "--circus-ini",
        metavar="PATH",
        help="read the endpoints from [circus] and the options from --section of "
        "this circus.ini; flags override it (default: none)",
    )
    parser.add_argument(
        "--section",
        metavar="NAME",
        help="section of --circus-ini holding the options: a [plugin:NAME] "
        "section is read as circusd passes it to a plugin; any other, such as "
        f"[watchdog], is read as written (default: {DEFAULT_SECTION})",
    )


def config_from_args(ns: argparse.Namespace) -> Config:
    """Build the Config from parsed flags over the --circus-ini section, if any."""
    path = getattr(ns, "circus_ini", None)
    section = getattr(ns, "section", None)
    if path is None:
        if section is not None:
            raise ConfigError(f"invalid --section {section!r}: needs --circus-ini")
        return Config.from_args(ns)
    return Config.from_args(ns, read_circus_ini(path, section or DEFAULT_SECTION))


def read_circus_ini(path: str, section: str = DEFAULT_SECTION) -> CircusIni:
    """Read a circus.ini as circusd does; a plugin section as the plugin receives it."""
    try:
        # circus's own reader: includes, [env] and $(circus.env.*) substitution.
        circus_cfg = get_config(path)
        if section.startswith("plugin:"):
            sections = {plugin["name"]: plugin for plugin in circus_cfg["plugins"]}
        else:
            sections = _plain_sections(path)
    except (OSError, configparser.Error, ValueError) as exc:
        raise ConfigError(
            f"invalid --circus-ini: expected a readable circus.ini, got {path!r} "
            f"({str(exc).strip()})"
        ) from None
    if section not in sections:
        present = ", ".join(f"[{name}]" for name in sections) or "none"
        kind = "a plugin section" if section.startswith("plugin:") else "a section"
        raise ConfigError(
            f"invalid --section: expected {kind} of {path!r} (present: {present}), "
            f"got {section!r}"
        )
    source = f"[{section}] of {path}"
    values = dict(sections[section])
    if section.startswith("plugin:"):
        options = _as_plugin_receives(values, source)
    else:
        options = {
            key: _strip_quotes(str(value))
            for key, value in values.items()
            if key != "__name__"  # added by circus's StrictConfigParser
        }
    return CircusIni(
        options, circus_cfg["endpoint"], circus_cfg["pubsub_endpoint"], source
    )


def _plain_sections(path: str) -> dict[str, dict[str, str]]:
    """Every section but circus's own, with [env] substitution as circusd does."""
    cfg, _ = read_config(path)
    env = dict(os.environ)
    if cfg.has_section("env"):
        env.update(cfg.items("env"))
    cfg.set_env(env)
    return {
        name: dict(cfg.items(name))
        for name in cfg.sections()
        if name not in ("circus", "env") and not name.startswith("plugin:")
    }


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


def _as_plugin_receives(plugin: Mapping[str, Any], source: str) -> dict[str, str]:
    """Pass a section through circus's plugin command line, as circusd does.

    circus.plugins.get_plugin_cmd drops `use` and joins the rest into one
    `--config key:value:::...` word of a command line that the plugin's watcher
    splits with shlex.split (circus/process.py): quotes are removed, unquoted
    backslashes are dropped and unquoted whitespace splits the word, which
    breaks the plugin's own argument parsing.
    """
    section = {key: value for key, value in plugin.items() if key != "use"}
    written: dict[str, str] = {}
    for key, value in section.items():
        written[key] = _unquote(key, value, source)
        text = str(value)
        if "\\" in text and not any(q in text for q in "\"'") and written[key] != text:
            logger.warning(
                "%s in %s reaches the plugin as %r: circus drops unquoted "
                "backslashes; double-quote the value to keep them",
                key,
                source,
                written[key],
            )
    if not section:
        return {}
    (word,) = shlex.split(_cfg2str(section))
    received: dict[str, str] = _str2cfg(word)
    changed = sorted(key for key in written if received.get(key) != written[key])
    if changed:
        logger.warning(
            "circus does not pass %s of %s to the plugin as written: an empty "
            "value swallows the option after it and ':::' splits a value; delete "
            "empty options instead",
            ", ".join(changed),
            source,
        )
    return received
