"""run_in_own_thread: blocking work off the event loop, in a thread that ends with it."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from app.services.own_thread import run_in_own_thread


async def test_the_result_or_the_error_comes_back_and_the_thread_ends() -> None:
    threads: list[threading.Thread] = []

    def work(x: int) -> int:
        threads.append(threading.current_thread())
        return x * 2

    assert await run_in_own_thread(work, 21) == 42
    assert threads[0] is not threading.main_thread()
    threads[0].join(timeout=5)
    assert not threads[0].is_alive()

    def fail() -> None:
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        await run_in_own_thread(fail)


async def test_a_cancelled_caller_waits_for_the_work_unless_it_abandons_it() -> None:
    finished = threading.Event()

    def slow() -> None:
        time.sleep(0.3)
        finished.set()

    waiting = asyncio.create_task(run_in_own_thread(slow))
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert finished.is_set()  # the caller left only once the work was done

    finished.clear()
    leaving = asyncio.create_task(run_in_own_thread(slow, abandon_on_cancel=True))
    await asyncio.sleep(0.05)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert not finished.is_set()  # it left at once; the work runs on
    assert await asyncio.to_thread(finished.wait, 5)
