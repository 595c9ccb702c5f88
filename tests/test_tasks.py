"""tasks.end: a stop that cannot hang on a swallowed cancel (cpython gh-86296)."""

from __future__ import annotations

import asyncio
import logging
import sys

import pytest

from circus_watchdog import tasks


async def _retrying_caller(reply: asyncio.Future[int], calls: list[int]) -> None:
    # The shape of the re-sync loop: a call bounded by wait_for, retried for ever.
    async def roundtrip() -> int:
        return await reply

    while len(calls) < 1000:  # bounded: the test ends it long before
        calls.append(1)
        try:
            await asyncio.wait_for(roundtrip(), 5)
        except asyncio.TimeoutError:
            pass
        await asyncio.sleep(0.001)


async def _cancel_as_the_reply_comes(
    loop: asyncio.AbstractEventLoop,
) -> tuple[asyncio.Task[None], list[int]]:
    reply: asyncio.Future[int] = loop.create_future()
    calls: list[int] = []
    task = asyncio.create_task(_retrying_caller(reply, calls))
    for _ in range(3):
        await asyncio.sleep(0)  # the task is now waiting for the reply
    reply.set_result(1)
    await asyncio.sleep(0)  # the reply is in: wait_for's waiter is released
    task.cancel()  # and the stop comes in the same turn of the loop
    return task, calls


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="fixed in Python 3.12")
def test_the_race_is_real_before_python_3_12() -> None:
    """The premise: one cancel, in that turn, leaves the loop running."""

    async def main() -> bool:
        task, calls = await _cancel_as_the_reply_comes(asyncio.get_running_loop())
        await asyncio.sleep(0.05)
        running = not task.done() and len(calls) > 1
        await tasks.end([task])
        return running

    assert asyncio.run(main())


def test_end_ends_a_task_that_swallowed_its_cancel() -> None:
    async def main() -> asyncio.Task[None]:
        task, _ = await _cancel_as_the_reply_comes(asyncio.get_running_loop())
        await tasks.end([task], wait=0.05)
        return task

    task = asyncio.run(main())
    assert task.cancelled()


def test_end_gives_up_on_a_task_that_will_not_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Bounded: three cancels, then an error naming the task, and return."""

    async def stubborn(released: asyncio.Event) -> None:
        while not released.is_set():
            try:
                await released.wait()
            except asyncio.CancelledError:
                pass

    async def main() -> int:
        released = asyncio.Event()
        task = asyncio.create_task(stubborn(released), name="stubborn")
        await asyncio.sleep(0)
        await tasks.end([task], rounds=3, wait=0.01)
        running = not task.done()
        released.set()
        await task
        return running

    with caplog.at_level(logging.ERROR, logger="circus.watchdog"):
        assert asyncio.run(main())
    assert "1 task(s) still running after 3 cancels: stubborn" in caplog.text


def test_end_drops_results_and_errors() -> None:
    async def fails() -> None:
        raise RuntimeError("a bug")

    async def main() -> list[asyncio.Task[None]]:
        done = [asyncio.create_task(fails()), asyncio.create_task(asyncio.sleep(0))]
        await asyncio.sleep(0.01)
        waiting = asyncio.create_task(asyncio.sleep(60))
        current = asyncio.current_task()
        assert current is not None
        await tasks.end([*done, waiting, current])  # never cancels the caller
        return [*done, waiting]

    failed, finished, waiting = asyncio.run(main())
    assert isinstance(failed.exception(), RuntimeError)
    assert finished.done() and not finished.cancelled()
    assert waiting.cancelled()
