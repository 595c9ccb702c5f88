"""Chooses the compiled core or its pure-Python twin (one API, two bodies).

Order: the pure twin for type checkers (it is the typing source of truth);
the pure twin when CIRCUS_WATCHDOG_NO_EXTENSIONS is set, off CPython, or off
Linux (no recvmmsg); else the compiled twin, or the pure one if it is not
built or its import fails in any way (with a RuntimeWarning unless it is
simply absent): a broken build never breaks ``import circus_watchdog``.
`select` makes that choice for any pair of twins (loadgen's sender too).
"""

from __future__ import annotations

import importlib
import os
import platform
import sys
import warnings
from types import ModuleType
from typing import TYPE_CHECKING

__all__ = (
    "DrainCounts",
    "HeartbeatTable",
    "compiled",
    "heartbeat_timestamp",
    "notify_kind",
    "parse_heartbeat",
)


def select(compiled_name: str, pure: ModuleType) -> tuple[ModuleType, bool]:
    """The compiled twin named ``compiled_name``, or ``pure``; whether compiled."""
    if (
        os.environ.get("CIRCUS_WATCHDOG_NO_EXTENSIONS")
        or platform.python_implementation() != "CPython"
        or not sys.platform.startswith("linux")
    ):
        return pure, False
    try:
        return importlib.import_module(compiled_name), True
    except ImportError:  # not built, or built for another ABI
        return pure, False
    except Exception as exc:  # noqa: BLE001 - its module init failed: never fatal
        warnings.warn(
            f"circus-watchdog: {compiled_name} failed to import ({exc!r}); "
            "using its pure-Python twin",
            RuntimeWarning,
            stacklevel=2,
        )
        return pure, False


if TYPE_CHECKING:
    from ._core_py import (
        DrainCounts,
        HeartbeatTable,
        heartbeat_timestamp,
        notify_kind,
        parse_heartbeat,
    )

    compiled = False
else:
    from . import _core_py

    _impl, compiled = select(f"{__package__}._core_c", _core_py)
    globals().update({n: getattr(_impl, n) for n in __all__ if n != "compiled"})
