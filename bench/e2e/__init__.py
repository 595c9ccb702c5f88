"""End-to-end benchmark: the whole daemon, the original and two C floors.

``python -m bench.e2e`` (from the repository root) measures, side by side in
one run, interleaved, the order rotated each repetition:

- ``daemon``: the standalone ``circus-watchdog`` on a real circusd whose
  ``fleet`` watcher runs ``--procs`` processes; the flood carries their real
  pids, so every datagram is a heartbeat of a monitored pid;
- ``original``: circus 0.19's ``WatchDog`` receive path on its tornado loop
  (``original.py``), the same pids in its ``pid_status``;
- ``floor_block`` and ``floor_sleep``: bare C programs (bench/floors/), one
  blocking in ``recvmmsg(MSG_WAITFORONE)``, one draining with
  ``MSG_DONTWAIT`` then sleeping 1 ms.

CPU per heartbeat is each receiver process's own user + system time (psutil,
all threads) over the window divided by the heartbeats it counted. Modules:
``floors`` (build and run the C floors), ``sender`` (loadgen runs and backlog
fills), ``receivers`` (the four receivers behind one interface), ``accounting``
(CPU, socket queue and drop counters), ``matrix`` (the phases), ``report``
(medians, tables, plot) and ``cli``. docs/benchmarks.md says what it found.
"""

import sys
from pathlib import Path

# circusd and the standalone command on free ports come from the tests' harness
# (tests/harness.py), imported as ``harness``: appended, so that nothing in
# tests/ shadows a module of bench/.
_TESTS = str(Path(__file__).resolve().parents[2] / "tests")
if _TESTS not in sys.path:
    sys.path.append(_TESTS)
