"""Public home of the heartbeat core: ``from circus_watchdog.core import ...``."""

from ._core import *  # noqa: F403 - the selector's public names, nothing else
from ._core import __all__ as __all__
