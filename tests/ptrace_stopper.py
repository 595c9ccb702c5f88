"""Put a process in a real ptrace stop, as a debugger does, for a while.

``python ptrace_stopper.py PID SECONDS``

Attaches to every thread of PID with PTRACE_SEIZE, stops each with
PTRACE_INTERRUPT (ptrace(2): the thread enters a group-stop-like ptrace stop,
state ``t``, and ``TracerPid`` in /proc/PID/status names this process), prints
``stopped`` once all are, and keeps them stopped for SECONDS; then
PTRACE_DETACH resumes them.  Should PID die meanwhile (killed while stopped),
it reaps the ptrace notification, so that the real parent (circusd) learns of
the death at once, and exits.  Linux only; needs the right to ptrace PID.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time

PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
WALL = 0x40000000  # __WALL: wait for any thread, clone or not
POLL = 0.05  # seconds

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
_libc.ptrace.restype = ctypes.c_long


def ptrace(request: int, tid: int) -> None:
    if _libc.ptrace(request, tid, None, None) == -1:
        errno = ctypes.get_errno()
        raise OSError(errno, f"ptrace({request:#x}, {tid}): {os.strerror(errno)}")


def stop(pid: int) -> list[int]:
    """Seize and stop each thread of ``pid``; their tids."""
    tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    for tid in tids:
        ptrace(PTRACE_SEIZE, tid)
        ptrace(PTRACE_INTERRUPT, tid)
    for tid in tids:
        _, status = os.waitpid(tid, WALL)
        if not os.WIFSTOPPED(status):
            raise SystemExit(f"thread {tid} did not stop: status {status:#x}")
    return tids


def hold(tids: list[int], seconds: float) -> bool:
    """Keep them stopped for ``seconds``; False if the process died."""
    deadline = time.monotonic() + seconds
    for _ in range(int(seconds / POLL) + 2):
        for tid in tids:
            try:
                waited, status = os.waitpid(tid, WALL | os.WNOHANG)
            except ChildProcessError:
                return False  # gone and already reaped
            if waited and (os.WIFEXITED(status) or os.WIFSIGNALED(status)):
                return False
        if time.monotonic() >= deadline:
            break
        time.sleep(POLL)
    return True


def main() -> None:
    pid, seconds = int(sys.argv[1]), float(sys.argv[2])
    tids = stop(pid)
    print("stopped", flush=True)
    if not hold(tids, seconds):
        print("died", flush=True)
        return
    for tid in tids:
        try:
            ptrace(PTRACE_DETACH, tid)
        except ProcessLookupError:
            pass  # died just now: detached already
    print("detached", flush=True)


if __name__ == "__main__":
    main()
