"""Declares the compiled core and loadgen's compiled sender; everything else
lives in pyproject.toml.

CIRCUS_WATCHDOG_NO_EXTENSIONS=1 skips both.
CIRCUS_WATCHDOG_REQUIRE_EXTENSIONS=1 turns a failed compile into an error
(CI and wheel builds set it); otherwise a failed compile falls back to the
pure-Python core with a loud warning.
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

NO_EXTENSIONS = bool(os.environ.get("CIRCUS_WATCHDOG_NO_EXTENSIONS"))
REQUIRE_EXTENSIONS = bool(os.environ.get("CIRCUS_WATCHDOG_REQUIRE_EXTENSIONS"))
BANNER = "*" * 72


def _say(lines: list[str]) -> None:
    print(BANNER, *lines, BANNER, sep="\n", file=sys.stderr)


class OptionalBuildExt(build_ext):
    """Builds each extension, or falls back to its pure twin unless required."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any failure means no compiler
            self._fallback(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._fallback(exc)
        else:
            _say([f"circus-watchdog: Accelerated build ({ext.name})."])

    def _fallback(self, exc: Exception) -> None:
        if REQUIRE_EXTENSIONS:
            raise
        _say(
            [
                f"WARNING: a compiled twin failed to build ({exc}).",
                "circus-watchdog will use its pure-Python twin, which is",
                "several times slower. Install a C compiler and Python headers,",
                "or set CIRCUS_WATCHDOG_REQUIRE_EXTENSIONS=1 to make this fatal.",
            ]
        )


if NO_EXTENSIONS:
    _say(["circus-watchdog: Pure Python build (CIRCUS_WATCHDOG_NO_EXTENSIONS)."])
    ext_modules = []
else:
    # setuptools' build_ext runs Cython on .pyx sources when Cython is present
    # (it is in build-system.requires), inside build_extension, so a failure
    # there reaches OptionalBuildExt's fallback.
    # include_dirs: the sender cimports circus_watchdog/_syscalls.pxd.
    ext_modules = [
        Extension(
            "circus_watchdog._core_c",
            ["src/circus_watchdog/_core_c.pyx"],
            extra_compile_args=["-O3"],
        ),
        Extension(
            "circus_watchdog.loadgen._send_c",
            ["loadgen/_send_c.pyx"],
            include_dirs=["src"],
            extra_compile_args=["-O3"],
        ),
    ]

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
