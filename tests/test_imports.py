"""Every module imports on its own; the compiled core is the default once built."""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys

import pytest

import circus_watchdog

MODULES = sorted(
    f"circus_watchdog.{m.name}"
    for m in pkgutil.iter_modules(circus_watchdog.__path__)
    if m.name != "__main__"
)


def run(code: str, **env: str) -> str:
    environ = {
        k: v for k, v in os.environ.items() if k != "CIRCUS_WATCHDOG_NO_EXTENSIONS"
    }
    environ.update(env)
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        env=environ,
        timeout=60,
        check=True,
    )
    return out.stdout.strip()


@pytest.mark.parametrize("module", MODULES)
def test_imports_on_its_own(module: str) -> None:
    run(f"import {module}")


def test_package_import_is_cheap() -> None:
    heavy = run(
        "import sys, circus_watchdog; "
        "print(sorted(m for m in ('zmq', 'uvloop', 'circus', 'orjson') "
        "if m in sys.modules))"
    )
    assert heavy == "[]"


@pytest.mark.c_extension
def test_c_extension_preferred_by_default() -> None:
    assert run("import circus_watchdog; print(circus_watchdog.compiled)") == "True"
    assert (
        run("from circus_watchdog.core import HeartbeatTable as T; print(T.__module__)")
        == "circus_watchdog._core_c"
    )


def test_env_var_forces_pure_python() -> None:
    out = run(
        "import circus_watchdog, circus_watchdog.core as c; "
        "print(circus_watchdog.compiled, c.HeartbeatTable.__module__)",
        CIRCUS_WATCHDOG_NO_EXTENSIONS="1",
    )
    assert out == "False circus_watchdog._core_py"


def test_configuring_logs_loads_no_receiver_core_or_metrics() -> None:
    loaded = run(
        "import sys, circus_watchdog.logs; "
        "print(sorted(m for m in ('circus_watchdog.receiver', "
        "'circus_watchdog._core_c', 'circus_watchdog._core_py', 'prometheus_client') "
        "if m in sys.modules))"
    )
    assert loaded == "[]"
