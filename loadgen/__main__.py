"""Entry point of ``python -m loadgen`` and ``circus-watchdog-loadgen``."""

import sys

from loadgen.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
