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
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def run_in_own_thread(work: Callable[..., T], *args: Any, abandon_on_cancel: bool = False) -> T:
    """`work(*args)` in a new thread; its result or exception.

    A thread cannot be stopped: a cancelled caller waits until the work ends (so that a limiter held around this call
    stays honest), unless `abandon_on_cancel`, where it leaves at once and the work runs on unobserved."""
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
            outcome: tuple[T | None, BaseException | None] = (work(*args), None)
        except BaseException as exc:  # handed to the caller
            outcome = (None, exc)
        with contextlib.suppress(RuntimeError):  # the event loop closed meanwhile: nobody is waiting
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=run, name=f"chipi-{getattr(work, '__name__', 'work')}", daemon=True).start()
    if abandon_on_cancel:
        return await done
    try:
        return await asyncio.shield(done)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await done  # the work's own outcome no longer matters; its end does
        raise


def call_in_own_thread(work: Callable[..., T], *args: Any) -> T:
    """`work(*args)` in a new thread that ends with it, waiting for it; its result or exception. For blocking
    callers (loading the model in a script, a test or a benchmark) whose thread would otherwise keep an OpenMP team."""
    outcome: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(work(*args))
        except BaseException as exc:  # raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=run, name=f"chipi-{getattr(work, '__name__', 'work')}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return outcome[0]
