"""Chooses the compiled core or its pure-Python twin (one API, two bodies).

Order: the pure twin for type checkers (it is the typing source of truth);
the pure twin when CIRCUS_WATCHDOG_NO_EXTENSIONS is set, off CPython, or off
Linux (no recvmmsg); else the compiled twin, or the pure one if it is not
built or its import fails in any way (with a RuntimeWarning unless it is
simply absent): a broken build never breaks ``import circus_watchdog``.
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
    "send_datagrams",
    "send_heartbeats",
)


def _choose() -> tuple[ModuleType, bool]:
    from . import _core_py  # noqa: PLC0415 - import only the twin we use

    if (
        os.environ.get("CIRCUS_WATCHDOG_NO_EXTENSIONS")
        or platform.python_implementation() != "CPython"
        or not sys.platform.startswith("linux")
    ):
        return _core_py, False
    try:
        return importlib.import_module(f"{__package__}._core_c"), True
    except ImportError:  # not built, or built for another ABI
        return _core_py, False
    except Exception as exc:  # noqa: BLE001 - its module init failed: never fatal
        warnings.warn(
            f"circus-watchdog: the compiled core failed to import ({exc!r}); "
            "using the pure-Python core",
            RuntimeWarning,
            stacklevel=2,
        )
        return _core_py, False


if TYPE_CHECKING:
    from ._core_py import (
        DrainCounts,
        HeartbeatTable,
        heartbeat_timestamp,
        notify_kind,
        parse_heartbeat,
        send_datagrams,
        send_heartbeats,
    )

    compiled = False
else:
    _impl, compiled = _choose()
    globals().update({n: getattr(_impl, n) for n in __all__ if n != "compiled"})
