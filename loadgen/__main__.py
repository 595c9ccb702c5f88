"""Entry point of ``python -m circus_watchdog.loadgen`` and
``circus-watchdog-loadgen``."""

import sys

from .cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
