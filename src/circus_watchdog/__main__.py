"""``python -m circus_watchdog``: the same as the ``circus-watchdog`` command."""

from .cli import main

raise SystemExit(main())
