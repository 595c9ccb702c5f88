"""loadgen's workers: one in this process, or one process each behind a
start barrier, and the collection of their results."""

from __future__ import annotations

import multiprocessing
import queue
import threading
import time
from collections.abc import Sequence
from multiprocessing.queues import Queue
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event as EventType

from . import flood
from .flood import Plan, Result
from .options import RunError
from .report import REPORT_EVERY, Progress

RESULT_GRACE = 10.0  # seconds past the duration to wait for worker results


def run_inline(plan: Plan, progress: Progress) -> list[Result]:
    """One worker, in this process."""
    try:
        sock = flood.open_socket(plan)
    except OSError as exc:
        raise RunError(f"cannot open a socket to --target: {exc}") from None
    with sock:
        progress.restart()

        def report(sent: int) -> bool:
            progress.update(sent)
            return False

        return [flood.run(plan, sock, report)]


def run_processes(plans: Sequence[Plan], progress: Progress) -> list[Result]:
    """One process per plan (spawn context), started together behind a barrier.

    Each worker opens its socket, then waits at ``barrier`` with this process:
    the flood starts when every socket is open (a worker that cannot open one
    puts an error on ``results`` and breaks the barrier). ``sent[i]`` is worker
    i's running count, ``stop`` asks them all to stop (Ctrl-C), and each puts
    its `Result` on ``results``.
    """
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(plans) + 1, timeout=flood.STARTUP_TIMEOUT)
    stop = ctx.Event()
    results: Queue[tuple[int, Result | str]] = ctx.Queue()
    sent = [ctx.Value("q", 0, lock=False) for _ in plans]
    procs: list[multiprocessing.context.SpawnProcess] = []
    try:
        for plan, counter in zip(plans, sent, strict=True):
            proc = ctx.Process(
                target=flood.worker_main,
                args=(plan, flood.Control(barrier, stop, counter, results)),
                name=f"loadgen-worker-{plan.index}",
                daemon=True,
            )
            proc.start()
            procs.append(proc)
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            raise RunError(_start_failure(results, len(plans))) from None
        progress.restart()
        return _collect(plans, procs, sent, stop, results, progress)
    finally:
        stop.set()
        for proc in procs:
            proc.join(timeout=2.0)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=2.0)
            proc.close()
        results.close()
        results.join_thread()


def _start_failure(results: Queue[tuple[int, Result | str]], workers: int) -> str:
    """Why the start barrier broke: a worker's error, or the start timeout."""
    try:
        _, detail = results.get(timeout=1.0)
    except queue.Empty:
        return f"the {workers} workers did not all start in time"
    if isinstance(detail, str):
        return f"cannot open a socket to --target: {detail}"
    return "a worker did not start"


def _collect(
    plans: Sequence[Plan],
    procs: Sequence[multiprocessing.context.SpawnProcess],
    sent: Sequence[Synchronized[int]],
    stop: EventType,
    results: Queue[tuple[int, Result | str]],
    progress: Progress,
) -> list[Result]:
    done: dict[int, Result] = {}
    deadline = time.monotonic() + plans[0].duration + RESULT_GRACE
    while len(done) < len(plans) and time.monotonic() < deadline:
        try:
            index, result = results.get(timeout=REPORT_EVERY)
        except queue.Empty:
            # A worker that exited without a result died (its queue is flushed
            # before it exits, so a result it put is already readable).
            for i, proc in enumerate(procs):
                if i not in done and proc.exitcode is not None and results.empty():
                    done[i] = Result(worker=i, error="worker died")
        except KeyboardInterrupt:
            if stop.is_set():
                raise
            stop.set()
            deadline = min(deadline, time.monotonic() + RESULT_GRACE)
        else:
            if isinstance(result, Result):
                done[index] = result
        progress.update(sum(counter.value for counter in sent))
    late = "no result in time"
    return [done.get(i) or Result(worker=i, error=late) for i in range(len(plans))]
