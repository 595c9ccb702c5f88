"""Coverage-guided fuzzing of both cores' parsers and drains (atheris).

    python tests/fuzz_core.py -runs=100000        # or -max_total_time=60

Each input is split into datagrams; both cores parse them and drain them from
real (socketpair) sockets, and must agree with each other, never raise, and
never change the table for anything but a known pid.  Datagrams carry 0 to 47
passed descriptors (SCM_RIGHTS; more than 38 truncate the control data): both
cores must close every one and count the same truncations.
"""

from __future__ import annotations

import os
import socket
import sys

import atheris

with atheris.instrument_imports():
    from circus_watchdog import _core_c, _core_py

CORES = (_core_c, _core_py)
KNOWN = (1, 12, 2147483647)


def _pair() -> tuple[socket.socket, socket.socket]:
    rx, tx = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    return rx, tx


PAIRS = [_pair() for _ in CORES]
PASSED = os.open(os.devnull, os.O_RDONLY)  # the descriptor every sender attaches


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def one_input(data: bytes) -> None:
    datagrams = data.split(b"\x00\xff")[:8]  # stay under max_dgram_qlen
    for payload in datagrams:
        results = {core.parse_heartbeat(payload) for core in CORES}
        assert len(results) == 1, (payload, results)
        stamps = {core.heartbeat_timestamp(payload) for core in CORES}
        assert len(stamps) == 1, (payload, stamps)
        kinds = {core.notify_kind(payload) for core in CORES}
        assert len(kinds) == 1, (payload, kinds)
    for method in ("drain", "drain_notify"):
        outcomes = []
        for core, (rx, tx) in zip(CORES, PAIRS, strict=True):
            table = core.HeartbeatTable(3.0, 0.5)
            for pid in (*KNOWN, os.getpid()):
                table.add(pid, "w", 0.0)
            before = _open_fds()
            for i, payload in enumerate(datagrams):
                socket.send_fds(tx, [payload], [PASSED] * ((len(payload) * 5 + i) % 48))
            counts = getattr(table, method)(rx, 1.0, 100)
            state = sorted((p, table.last_seen(p)) for p in table.pids())
            outcomes.append((tuple(counts), state, table.control_truncated))
            assert counts.datagrams == len(datagrams)
            assert _open_fds() == before, (core.__name__, datagrams)
            assert len(table) == len(KNOWN) + 1
        assert outcomes[0] == outcomes[1], (datagrams, outcomes)


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
