"""Run blocking PyTorch work off the event loop in a thread of its own, which ends when the work is done.

PyTorch parallelises an operation with OpenMP, and GNU OpenMP (libgomp) gives every thread that starts parallel work
a team of worker threads, kept for as long as that thread lives. Once the threads of all teams outnumber the CPUs,
libgomp stops letting idle workers spin and puts them to sleep after every parallel region, so each of the hundreds
of small regions in a decode step pays a wake-up. One transcription in a pooled worker thread (which lives on) left
the decode engine 35% slower for good on the 2-core machine; the same work in a thread that then ends costs nothing
after it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def run_in_own_thread(work: Callable[..., T], *args: Any) -> T:
    """`work(*args)` in a new thread; its result or exception. Cancelling the caller does not stop the work."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.done():  # the caller was cancelled meanwhile
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result = work(*args)
        except BaseException as exc:  # handed to the caller
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, name=f"chipi-{getattr(work, '__name__', 'work')}", daemon=True).start()
    return await done
