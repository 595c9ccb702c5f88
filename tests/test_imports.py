"""Every module imports on its own; the compiled core is the default once built."""

from __future__ import annotations

import importlib.metadata
import os
import pkgutil
import subprocess
import sys

import pytest

import circus_watchdog
import circus_watchdog.loadgen

MODULES = sorted(
    f"{package.__name__}.{m.name}"
    for package in (circus_watchdog, circus_watchdog.loadgen)
    for m in pkgutil.iter_modules(package.__path__)
    if m.name != "__main__"
)


def python(code: str, warnings: str = "error", **env: str) -> tuple[str, str]:
    """Run ``code`` in a fresh interpreter; its stdout (stripped) and stderr."""
    environ = {
        k: v for k, v in os.environ.items() if k != "CIRCUS_WATCHDOG_NO_EXTENSIONS"
    }
    environ.update(env)
    out = subprocess.run(
        [sys.executable, "-W", warnings, "-c", code],
        capture_output=True,
        text=True,
        env=environ,
        timeout=60,
        check=True,
    )
    return out.stdout.strip(), out.stderr


def run(code: str, **env: str) -> str:
    return python(code, **env)[0]


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


def test_circusd_importing_the_plugin_loads_nothing_else_of_ours() -> None:
    """circusd imports ``use = circus_watchdog.plugin.WatchDog`` itself, to
    check the name, and keeps what it imported (7 MB when the plugin module
    imported the watchdog at its top)."""
    added = run(
        "import sys, circus.plugins; before = set(sys.modules); "
        "from circus.util import resolve_name; "
        "resolve_name('circus_watchdog.plugin.WatchDog'); "
        "print(sorted(set(sys.modules) - before))"
    )
    assert added == "['circus_watchdog', 'circus_watchdog.plugin']"


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


def test_broken_c_extension_falls_back() -> None:
    """A compiled core whose import raises anything (here a RuntimeError from
    its module init) leaves ``import circus_watchdog`` working on the pure
    core, with a RuntimeWarning that names the error."""
    code = (
        "import sys, importlib.abc\n"
        "class Broken(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'circus_watchdog._core_c':\n"
        "            raise RuntimeError('init failed')\n"
        "sys.meta_path.insert(0, Broken())\n"
        "import circus_watchdog, circus_watchdog.core as c\n"
        "print(circus_watchdog.compiled, c.HeartbeatTable.__module__)\n"
    )
    out, err = python(code, warnings="default")
    assert out == "False circus_watchdog._core_py"
    assert "RuntimeWarning" in err and "init failed" in err


def test_only_circus_watchdog_at_the_top_of_site_packages() -> None:
    """The installed distribution puts one package at the top level of
    site-packages, circus_watchdog (loadgen lives inside it, the test harness
    in tests/): besides it, only its .dist-info, its scripts and, for an
    editable install, setuptools' path hook."""
    dist = importlib.metadata.distribution("circus-watchdog")
    assert (dist.read_text("top_level.txt") or "").split() == ["circus_watchdog"]
    tops = {path.parts[0] for path in dist.files or ()}
    editable = {top for top in tops if top.startswith("__editable__")}
    others = tops - editable - {"circus_watchdog", "..", "__pycache__"}
    assert {top for top in others if not top.endswith(".dist-info")} == set()
    # An editable install maps names to folders: only circus_watchdog's.
    mapped = run(
        "import sys; print(sorted({n.split('.')[0] for f in sys.meta_path "
        "for n in getattr(sys.modules.get(f.__module__), 'MAPPING', {})}))"
    )
    assert mapped in ("[]", "['circus_watchdog']")
    scripts = {ep.name: ep.value for ep in dist.entry_points}
    assert scripts["circus-watchdog-loadgen"] == (
        "circus_watchdog.loadgen.__main__:main"
    )
    assert "circus_watchdog/harness.py" not in {str(p) for p in dist.files or ()}
