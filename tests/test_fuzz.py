"""A bounded atheris run over both cores' parsers and drains (tests/fuzz_core.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

HARNESS = Path(__file__).with_name("fuzz_core.py")


@pytest.mark.c_extension
def test_fuzz_both_cores(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(HARNESS), "-runs=20000", "-max_total_time=60"],
        cwd=tmp_path,  # crash files, if any, land here
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Done " in run.stderr and "Uncaught" not in run.stderr
