"""A lean HTTP/1.1 load generator: keep-alive connections, each sending GET after GET and timing each answer.

httpx spent 2.2 ms of CPU per list request where the server spent 3.0 (measured), on the same 2 cores as the server
and PostgreSQL. This client parses only what it needs (the status line and Content-Length) over plain asyncio
streams, in about 0.1 ms, so the machine is left to the server and the database, as with wrk.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True)
class LoadResult:
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    failures: int  # answers other than 200


async def _get_loop(base_url: str, path: str, deadline: float, latencies: list[float]) -> int:
    """GET `path` over one connection until `deadline`; the latencies are appended, the non-200 answers counted."""
    url = urlsplit(base_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    request = f"GET {path} HTTP/1.1\r\nHost: {url.netloc}\r\n\r\n".encode()
    failures = 0
    try:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status, length = _parse_head(head)
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            failures += status != 200
    finally:
        writer.close()
    return failures


def _parse_head(head: bytes) -> tuple[int, int]:
    """The status and Content-Length of a response head (this client never asks for anything chunked)."""
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return status, int(value)
    raise RuntimeError(f"a response without Content-Length: {head[:200]!r}")


async def load(base_url: str, path: str, seconds: float, concurrency: int) -> LoadResult:
    """GET `path` from `concurrency` connections for `seconds`."""
    latencies: list[float] = []
    started = time.perf_counter()
    failures = await asyncio.gather(
        *(_get_loop(base_url, path, started + seconds, latencies) for _ in range(concurrency))
    )
    elapsed = time.perf_counter() - started
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return LoadResult(len(latencies) / elapsed, statistics.median(latencies) * 1000, p99 * 1000, sum(failures))
