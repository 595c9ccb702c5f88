"""``circus-watchdog``: the standalone daemon, and ``circus-watchdog demo``.

Every option of :mod:`.config`'s table is a flag, grouped as the table is;
``--circus-ini`` and ``--section`` read the options from a circus.ini section
(:mod:`.circus_ini`) and flags override them. Warnings about that section are
logged once the log is set up, in its line format and place.

Exit status: 0 after SIGINT or SIGTERM; 2 for bad usage or a bad value (one
line on stderr naming the option and the value); 1 when the daemon cannot run
(a taken port, say: one line naming the option). ``--check`` exits the same
way without starting.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn

from . import logs, runner
from .circus_ini import DEFAULT_SECTION, CircusIni, read_circus_ini
from .config import OPTIONS, Config, ConfigError, flag
from .values import boolean

logger = logging.getLogger("circus.watchdog")

USAGE_ERROR = 2
RUNTIME_ERROR = 1


class _Parser(argparse.ArgumentParser):
    """One line per error instead of argparse's usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The standalone daemon's argument parser."""
    parser = _Parser(
        prog="circus-watchdog",
        description="Kill circus processes that stop sending heartbeats. "
        "Runs beside circusd; exits 0 on SIGINT or SIGTERM, 2 on a bad option, "
        "1 when it cannot run.",
        epilog="circus-watchdog demo [--duration S]: a live demo on a real circusd",
        allow_abbrev=False,  # --loop-rat must not pass for --loop-rate
    )
    parser.add_argument("--version", action="version", version=runner.describe())
    parser.add_argument(
        "--check",
        action="store_true",
        help="check the options, that log_output and diagnostic_dir can be "
        "written and that the UDP port, unix_socket and metrics port can be "
        "bound (then released), print one line and exit: 0 if they are good, "
        "2 for a bad option, 1 for a bind that fails; circusd is not contacted",
    )
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """A flag for every option, in groups, then --circus-ini and --section."""
    group: argparse._ActionsContainer = parser  # the table's first row has a group
    for name, option in OPTIONS.items():
        if option.group:
            group = parser.add_argument_group(option.group)
        # Every default is None so that config_from_args can tell given flags
        # from the rest: the real defaults live in the option table alone.
        shown = option.shown_default or option.default
        help_text = f"{option.help} (default: {shown})".replace("%", "%%")
        if option.parse is boolean:
            group.add_argument(
                flag(name),
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        else:
            group.add_argument(
                flag(name),
                dest=name,
                default=None,
                metavar=option.metavar,
                help=help_text,
            )
    group = parser.add_argument_group("circus.ini")
    group.add_argument(
        "--circus-ini",
        metavar="PATH",
        help="read the endpoints from [circus] and the options from --section of "
        "this circus.ini; flags override it (default: none)",
    )
    group.add_argument(
        "--section",
        metavar="NAME",
        help="section of --circus-ini holding the options: a [plugin:NAME] "
        "section is read as circusd passes it to a plugin; a section of the "
        f"watchdog's own, such as [watchdog], is read as written (default: "
        f"{DEFAULT_SECTION})",
    )


def ini_from_args(ns: argparse.Namespace) -> CircusIni | None:
    """The --circus-ini section named by the flags, or None without --circus-ini."""
    path = getattr(ns, "circus_ini", None)
    section = getattr(ns, "section", None)
    if path is None:
        if section is not None:
            raise ConfigError(f"invalid --section {section!r}: needs --circus-ini")
        return None
    return read_circus_ini(path, section or DEFAULT_SECTION)


def config_from_args(ns: argparse.Namespace, ini: CircusIni | None) -> Config:
    """The Config of parsed flags over the options and endpoints of ``ini``."""
    values: dict[str, str] = {}
    if ini is not None:
        values = dict(ini.options)
        values["endpoint"] = ini.endpoint
        values["pubsub_endpoint"] = ini.pubsub_endpoint
    for name in OPTIONS:
        given = getattr(ns, name, None)
        if isinstance(given, bool):  # BooleanOptionalAction
            values[name] = "true" if given else "false"
        elif given is not None:
            values[name] = given
    return Config.from_options(values)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``circus-watchdog`` command."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["demo"]:
        from .demo import main as demo  # noqa: PLC0415 - only the demo needs it

        return demo(args[1:])
    parser = build_parser()
    ns = parser.parse_args(args)
    try:
        ini = ini_from_args(ns)
        config = config_from_args(ns, ini)
        logs.configure(config)
    except ConfigError as exc:
        parser.error(str(exc))
    for warning in ini.warnings if ini is not None else ():
        logger.warning("%s", warning)
    try:
        if ns.check:
            runner.check(config)
            print(
                f"{parser.prog}: configuration OK"
                + (f" ({ini.source})" if ini is not None else "")
                + f"; ports free; circusd at {config.endpoint} (not contacted)"
            )
        else:
            runner.run(config)
    except OSError as exc:  # its message names the option (port, metrics_port...)
        message = runner.error_line(exc)
        if config.log_output != logs.STDOUT:  # else it would show twice
            logger.error("%s", message)
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return RUNTIME_ERROR
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
