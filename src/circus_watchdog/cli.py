"""``circus-watchdog``: the standalone daemon, and ``circus-watchdog demo``."""

from __future__ import annotations

import argparse
import logging
import sys

from circus.util import configure_logger

from . import runner
from .config import Config, ConfigError, add_arguments

logger = logging.getLogger("circus.watchdog")


def build_parser() -> argparse.ArgumentParser:
    """The standalone daemon's argument parser."""
    parser = argparse.ArgumentParser(
        prog="circus-watchdog",
        description="Kill circus processes that stop sending heartbeats. "
        "Runs beside circusd; exits 0 on SIGINT or SIGTERM.",
        epilog="circus-watchdog demo [--duration S]: a live demo on a real circusd",
    )
    parser.add_argument("--version", action="version", version=runner.describe())
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
        config = Config.from_args(ns)
    except ConfigError as exc:
        parser.error(str(exc))  # exits 2 with the message naming the option
    configure_logger(logging.getLogger(), config.log_level, config.log_output)
    try:
        runner.run(config)
    except OSError as exc:
        logger.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
