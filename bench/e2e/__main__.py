"""``python -m bench.e2e``: see the package docstring and ``--help``."""

from .cli import main

raise SystemExit(main())
