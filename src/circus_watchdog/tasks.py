"""Ending asyncio tasks, even those that missed a cancel.

Before Python 3.12, ``asyncio.wait_for`` swallows a cancel that comes as the
awaitable it waits for completes (cpython gh-86296, fixed by gh-96764): the
cancelled task runs on as if it had never been asked to stop.  A loop such as
the re-sync task's then keeps a stopping watchdog alive for ever.  :func:`end`
cancels again, every ``ROUND`` seconds, until the tasks have ended, and gives
up (with an error in the log) after ``ROUNDS`` rounds, so a stop is bounded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

logger = logging.getLogger("circus.watchdog")

ROUND = 0.5  # seconds between two cancels of a task that runs on
ROUNDS = 20  # cancels at most: a stop waits ROUNDS * ROUND = 10 s at most


async def end(
    tasks: Iterable[asyncio.Task[Any]], *, rounds: int = ROUNDS, wait: float = ROUND
) -> None:
    """Cancel ``tasks`` until they have ended (their results and errors are
    dropped); after ``rounds`` cancels, log those still running and return."""
    current = asyncio.current_task()
    pending = {task for task in tasks if task is not current}
    for _ in range(rounds):
        if not pending:
            return
        for task in pending:
            task.cancel()
        done, pending = await asyncio.wait(pending, timeout=wait)
        for task in done:  # retrieved, so asyncio does not log it again
            if not task.cancelled():
                task.exception()
    if pending:
        logger.error(
            "%d task(s) still running after %d cancels: %s",
            len(pending),
            rounds,
            ", ".join(sorted(task.get_name() for task in pending)),
        )
