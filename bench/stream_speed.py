"""Streaming speed through the API next to in-process generation, and start-up times.

    python -m bench.stream_speed [--runs 3] [--max-tokens 128] [--conversion]

Prints one table. Every ratio compares figures measured side by side in this run, on this machine:
the SSE endpoint of a real server (uvicorn subprocess, SQLite) against a plain in-process `model.generate`
of the same prompt token ids, greedy, runs interleaved so that machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from app.assets import convert_default_model, ensure_default_model
from app.domain.generation import ChatTurn
from app.services.model import ModelService
from app.settings import Settings
from bench.baseline import plain_generate
from bench.client import stream_reply
from bench.report import print_table
from tests.server import ChipiServer

PROMPT = "Write a long story about a dragon who learns to bake bread."


@dataclass
class Run:
    tokens: int
    seconds: float
    first_token_seconds: float | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


async def stream_once(base_url: str) -> Run:
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        session_id = (await client.post("/api/conversations/new")).json()["session_id"]
        reply = await stream_reply(client, session_id, PROMPT)
    return Run(reply.tokens, reply.seconds, reply.first_token_seconds)


def generate_once(model: ModelService, max_tokens: int) -> Run:
    prompt = model.build_prompt(None, [ChatTurn("user", PROMPT)], max_tokens)
    return Run(*plain_generate(model, prompt, max_tokens))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--conversion", action="store_true", help="also time a first-start fetch and conversion")
    args = parser.parse_args()

    rows: list[tuple[str, str]] = []
    if args.conversion:
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            convert_default_model(Path(tmp) / "model")
            rows.append(("first start: fetch + convert the default model", f"{time.perf_counter() - started:.1f} s"))
    ensure_default_model(Settings.from_env())

    with tempfile.TemporaryDirectory() as tmp:
        server = ChipiServer(
            f"sqlite+aiosqlite:///{tmp}/bench.db",
            CHIPI_MAX_NEW_TOKENS=str(args.max_tokens),
            CHIPI_CONTEXT_WINDOW="0",
        )
        started = time.perf_counter()
        server.start()
        rows.append(("later start: process start to ready (model converted)", f"{time.perf_counter() - started:.1f} s"))
        try:
            model = ModelService.load(Settings.from_env())
            generate_once(model, 8)  # warm-up, both sides
            asyncio.run(stream_once(server.url))
            sse_runs: list[Run] = []
            local_runs: list[Run] = []
            for _ in range(args.runs):
                sse_runs.append(asyncio.run(stream_once(server.url)))
                local_runs.append(generate_once(model, args.max_tokens))
            model.close()
        finally:
            server.stop()

    sse_rate = statistics.median(r.tokens_per_second for r in sse_runs)
    local_rate = statistics.median(r.tokens_per_second for r in local_runs)
    ttft = statistics.median(r.first_token_seconds or 0.0 for r in sse_runs)
    tokens = statistics.median(r.tokens for r in sse_runs)
    rows += [
        (f"in-process generate, tokens/s (median of {args.runs}, {tokens:.0f} tokens)", f"{local_rate:.1f}"),
        ("SSE endpoint, tokens/s end to end (same prompt ids, greedy)", f"{sse_rate:.1f}"),
        ("SSE / in-process", f"{sse_rate / local_rate:.2f}x"),
        ("SSE time to first token", f"{ttft * 1000:.0f} ms"),
    ]
    print_table(f"Chipi stream speed ({torch.get_num_threads()} torch threads, {Settings.from_env().model})", rows)


if __name__ == "__main__":
    main()
