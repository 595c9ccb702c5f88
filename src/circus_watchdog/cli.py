"""``circus-watchdog``: the standalone daemon, and ``circus-watchdog demo``.

Exit status: 0 after SIGINT or SIGTERM; 2 for bad usage or a bad value (one
line on stderr naming the option and the value); 1 when the daemon cannot run
(a taken port, say: one line naming the option).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn

from . import logs, runner
from .circus_ini import DEFAULT_SECTION, add_arguments, config_from_args
from .config import ConfigError

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
        help="check the options (and that log_output and diagnostic_dir can be "
        "written), print one line and exit: 0 if they are good, else 2",
    )
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``circus-watchdog`` command."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["demo"]:
        from .demo import main as demo  # noqa: PLC0415 - only the demo needs it

        return demo(args[1:])
    parser = build_parser()
    ns = parser.parse_args(args)
    try:
        config = config_from_args(ns)
        logs.configure(config)
    except ConfigError as exc:
        parser.error(str(exc))
    if ns.check:
        source = f"[{ns.section or DEFAULT_SECTION}] of {ns.circus_ini}"
        print(
            f"{parser.prog}: configuration OK"
            + (f" ({source})" if ns.circus_ini else "")
            + f"; circusd at {config.endpoint}"
        )
        return 0
    try:
        runner.run(config)
    except ConfigError as exc:
        parser.error(str(exc))
    except OSError as exc:  # its message names the option (port, metrics_port...)
        if config.log_output != logs.STDOUT:  # else it would show twice
            logger.error("%s", exc)
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return RUNTIME_ERROR
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
