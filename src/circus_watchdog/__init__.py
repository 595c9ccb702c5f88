"""circus-watchdog: a fast heartbeat watchdog for the circus process manager."""

from ._core import compiled

__version__ = "0.2.0.dev0"

__all__ = ("__version__", "compiled")
