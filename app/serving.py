"""`chipi serve`: uvicorn, with a graceful stop that lets running replies end and stores them before exit."""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
import sys

import uvicorn
from litestar import Litestar

from app.settings import Settings


class DrainingServer(uvicorn.Server):
    """On SIGTERM or Ctrl-C: stop accepting connections, let running replies finish for the grace period, stop the
    rest (stored as cancelled; their SSE and WebSocket clients get the last event), then uvicorn's own shutdown:
    open connections get the grace period again before they are cut, and the app's lifespan ends. A second Ctrl-C
    exits at once."""

    def __init__(self, config: uvicorn.Config, app: Litestar, grace_seconds: float) -> None:
        super().__init__(config)
        self._app = app
        self._grace_seconds = grace_seconds

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()  # no new connections while the replies drain
        readiness = getattr(self._app.state, "readiness", None)
        if readiness is not None and not self.force_exit:
            drain = asyncio.create_task(readiness.drain(self._grace_seconds))
            while not drain.done() and not self.force_exit:
                await asyncio.wait({drain}, timeout=0.1)
            if not drain.done():
                drain.cancel()
        await super().shutdown(sockets)


# glibc's mallopt parameters (malloc.h) and the fixed thresholds set for them, in bytes
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 1024 * 1024
TRIM_THRESHOLD_BYTES = 32 * 1024 * 1024


def return_freed_memory_to_the_system() -> None:
    """Keep resident memory flat under load. The model's tensors change size all the time (a batch of replies grows
    and shrinks, every step lengthens the keys and values); after large blocks are freed, glibc raises its mmap
    threshold (up to 32 MiB), so later large blocks come from the heap, which fragments and never shrinks: under
    bench.soak the server grew by 10% in 3 minutes. Fixed thresholds keep blocks of 1 MiB and more (the keys and
    values of long conversations and batches) mapped, given back when freed, and trim the heap once 32 MiB at its top
    are free. Lower thresholds cost prefill dearly: at glibc's initial 128 KiB every activation and weight tile of a
    prompt was a fresh mapping, paid in page faults, and a 20-token prefill took 128 ms instead of 94.
    MALLOC_* in the environment wins."""
    if sys.platform != "linux" or any(name.startswith("MALLOC_") for name in os.environ):
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)


def serve(app: Litestar, settings: Settings, *, ws_max_size: int) -> None:
    """Serve `app` on CHIPI_HOST:CHIPI_PORT until a signal stops it."""
    return_freed_memory_to_the_system()
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        ws_max_size=ws_max_size,
        access_log=False,  # Chipi writes its own access log (app/observability.py)
        timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_seconds)),
    )
    server = DrainingServer(config, app, settings.shutdown_grace_seconds)
    server.run()
    if not server.started:
        sys.exit(3)  # as uvicorn.run does when start-up failed
