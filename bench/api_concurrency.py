"""Concurrent streams through the API: aggregate tokens/s and time to first token under load.

    python -m bench.api_concurrency [--max-tokens 128] [--levels 1 2 4 8]

Starts a real server (uvicorn subprocess, SQLite, greedy decoding) and, for each level N, opens N SSE streams
at once, each in its own conversation with its own prompt. Prints aggregate completion tokens/s and time to
first token (median and max) for each level, each next to the single-stream figures measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from dataclasses import dataclass

import httpx

from app.assets import ensure_default_model
from app.settings import Settings
from bench.client import stream_reply
from tests.server import ChipiServer

PROMPTS = [
    "Write a long story about a dragon who learns to bake bread.",
    "Explain how a bicycle works, in detail.",
    "Describe a day in the life of a lighthouse keeper.",
    "Write a long letter to a friend about a trip to the mountains.",
    "Explain the water cycle to a child, step by step.",
    "Write a story about a robot who wants to become a gardener.",
    "Describe how bread is made, from wheat field to table.",
    "Write a long poem about the sea and the wind.",
]


@dataclass
class StreamRun:
    tokens: int
    first_token_seconds: float


async def one_stream(client: httpx.AsyncClient, prompt: str) -> StreamRun:
    session_id = (await client.post("/api/conversations/new")).json()["session_id"]
    reply = await stream_reply(client, session_id, prompt)
    return StreamRun(reply.tokens, reply.first_token_seconds)


async def level(base_url: str, streams: int) -> tuple[float, list[StreamRun]]:
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        started = time.perf_counter()
        runs = await asyncio.gather(*(one_stream(client, PROMPTS[i % len(PROMPTS)]) for i in range(streams)))
        elapsed = time.perf_counter() - started
    return sum(run.tokens for run in runs) / elapsed, list(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args()
    ensure_default_model(Settings.from_env())
    with (
        tempfile.TemporaryDirectory() as tmp,
        ChipiServer(
            f"sqlite+aiosqlite:///{tmp}/bench.db",
            CHIPI_MAX_NEW_TOKENS=str(args.max_tokens),
            CHIPI_CONTEXT_WINDOW="0",
            CHIPI_MAX_CONCURRENT_GENERATIONS=str(max(args.levels)),
        ) as server,
    ):
        asyncio.run(level(server.url, 1))  # warm-up
        results = {streams: asyncio.run(level(server.url, streams)) for streams in args.levels}
    base_rate, base_runs = results[min(args.levels)]
    base_ttft = statistics.median(run.first_token_seconds for run in base_runs)
    print(f"\nChipi concurrent streams through the API ({args.max_tokens} tokens max, greedy)")
    print(f"  {'streams':>7}  {'tokens/s':>9}  {'vs 1':>6}  {'TTFT median':>12}  {'TTFT max':>9}  {'vs 1':>6}")
    for streams, (rate, runs) in results.items():
        ttfts = [run.first_token_seconds for run in runs]
        print(
            f"  {streams:>7}  {rate:>9.1f}  {rate / base_rate:>5.2f}x  {statistics.median(ttfts) * 1000:>10.0f}ms"
            f"  {max(ttfts) * 1000:>7.0f}ms  {statistics.median(ttfts) / base_ttft:>5.2f}x"
        )


if __name__ == "__main__":
    main()
