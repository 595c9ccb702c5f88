"""circus-watchdog: a fast heartbeat watchdog for the circus process manager."""

from typing import TYPE_CHECKING

__version__ = "0.3.0.dev0"

__all__ = ("__version__", "compiled")

if TYPE_CHECKING:
    from ._core import compiled
else:

    def __getattr__(name: str) -> object:
        # The core is chosen (and loaded) on first use: modules that do not
        # read heartbeats (logs, config, the client) do not load it.
        if name == "compiled":
            from ._core import compiled  # noqa: PLC0415

            return compiled
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
