"""Chipi's performance on this machine, in one table.

    python -m bench.suite [--max-tokens 128] [--runs 3] [--conversations 5] [--load-seconds 10]

Every figure that compares is measured side by side in this run, so the ratios hold on a noisy machine:
- single-stream decode tokens/s through the SSE endpoint, next to the same engine in-process (ModelService.stream in
  this process), and next to llama.cpp on the very GGUF file the default model comes from when llama-cpp-python is
  installed (`pip install llama-cpp-python`; it is not a dependency of Chipi; bench/llama_cpp.py runs it in a child
  process); medians over twice --runs runs, alternated;
- time to first token through the API: a short prompt, a message of about 1,500 tokens, and turns 1 and 10 of a
  growing conversation (medians over --conversations conversations: a single turn's time swings by half with
  the machine's noise);
- aggregate tokens/s for 1, 4 and 8 concurrent streams (medians over --runs rounds that alternate the levels);
- the same engine in-process for 1 and 8 streams, greedy and sampled as the server samples by default
  (CHIPI_TEMPERATURE, CHIPI_TOP_P; the API figures above are greedy), rounds alternating;
- HTTP requests/s and p50/p99 latency of list and get (a conversation of 100 messages) on PostgreSQL, under a
  concurrent load generator running on the same machine (bench/http_load.py: lean, but it and PostgreSQL still take
  CPU from the server, so the figures are a floor);
- time from process start to ready, and the server's peak resident memory with the model, whisper and the voice
  loaded.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
from sqlalchemy.engine import make_url

from app.assets import ensure_default_model
from app.domain.generation import ChatTurn, GenerationFinished, GenerationParams, Prompt, TextDelta
from app.services.engine import READ_AHEAD_AFTER_SECONDS
from app.services.model import ModelService
from app.settings import Settings
from bench import concurrency, http_load, llama_cpp
from bench.api_concurrency import level
from bench.client import StreamedReply, stream_reply
from bench.report import print_table
from bench.turns import play
from tests.server import ChipiServer

PROMPT = "Write a long story about a dragon who learns to bake bread."
LONG_PARAGRAPH = (
    "The committee met on a rainy Tuesday to review the harbour plans. Engineers described the new breakwater, "
    "the dredging schedule and the cost of moving the ferry terminal, while residents asked about noise and traffic. "
)
# Long enough for an engine to read a finished reply's next turn opening ahead (engine.READ_AHEAD_AFTER_SECONDS).
SETTLE_SECONDS = READ_AHEAD_AFTER_SECONDS + 0.25
POSTGRES_ADMIN_URL = os.environ.get("CHIPI_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


# -- single stream -----------------------------------------------------------------------------------------------


async def sse_reply(client: httpx.AsyncClient, prompt: str, *, stop_after_first: bool = False) -> StreamedReply:
    """One reply streamed in a new conversation."""
    session_id = (await client.post("/api/conversations/new")).json()["session_id"]
    return await stream_reply(client, session_id, prompt, stop_after_first=stop_after_first)


async def in_process_reply(model: ModelService, prompt: Prompt, max_tokens: int) -> tuple[int, float]:
    started = time.perf_counter()
    async for output in model.stream(prompt, GenerationParams(max_tokens, 0.0, 1.0), threading.Event()):
        if isinstance(output, GenerationFinished):
            return output.completion_tokens, time.perf_counter() - started
        assert isinstance(output, TextDelta)
    raise RuntimeError("the stream ended without GenerationFinished")


async def sampling_rows(model: ModelService, settings: Settings, args: argparse.Namespace) -> list[tuple[str, str]]:
    """1 and 8 in-process streams, greedy and at the server's default sampling, rounds alternating (medians)."""
    prompts = [model.build_prompt(None, [ChatTurn("user", text)], args.max_tokens) for text in concurrency.PROMPTS]
    decodings = {
        "greedy": GenerationParams(args.max_tokens, 0.0, 1.0),
        f"sampled (temperature {settings.temperature}, top-p {settings.top_p})": GenerationParams(
            args.max_tokens, settings.temperature, settings.top_p
        ),
    }
    rates: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.runs):
        for name, params in decodings.items():
            for streams in (1, 8):
                round_ = await concurrency.one_round(model, prompts, streams, params)
                rates.setdefault((name, streams), []).append(round_.tokens_per_second)
    rate = {key: statistics.median(values) for key, values in rates.items()}
    greedy = next(iter(decodings))
    rows = []
    for name in decodings:
        figures = f"{rate[name, 1]:.1f} / {rate[name, 8]:.1f} ({rate[name, 8] / rate[name, 1]:.2f}x)"
        if name != greedy:
            figures += f"; {rate[name, 1] / rate[greedy, 1]:.2f}x / {rate[name, 8] / rate[greedy, 8]:.2f}x greedy"
        rows.append((f"in-process, {name}: 1 / 8 streams, tokens/s", figures))
    return rows


# -- HTTP load on PostgreSQL --------------------------------------------------------------------------------------


@contextmanager
def postgres_database() -> Iterator[str]:
    name = f"chipi_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            url = make_url(POSTGRES_ADMIN_URL).set(drivername="postgresql+psycopg", database=name)
            yield url.render_as_string(hide_password=False)
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def conversation_export(messages: int) -> dict[str, Any]:
    """An importable conversation of `messages` alternating user and assistant messages."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    ids = [str(uuid.uuid4()) for _ in range(messages)]
    return {
        "session_id": str(uuid.uuid4()),
        "title": "Harbour plans",
        "title_source": "manual",
        "model": "bench",
        "created_at": start.isoformat(),
        "updated_at": start.isoformat(),
        "active_message_id": ids[-1],
        "messages": [
            {
                "id": ids[i],
                "parent_id": ids[i - 1] if i else None,
                "role": "user" if i % 2 == 0 else "assistant",
                "content": LONG_PARAGRAPH if i % 2 else "Tell me more about the harbour.",
                "created_at": (start + timedelta(seconds=i)).isoformat(),
            }
            for i in range(messages)
        ],
    }


async def http_rows(base_url: str, seconds: float, concurrency: int) -> list[tuple[str, str]]:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        for _ in range(30):  # a list page of 20 to return
            (await client.post("/api/conversations/import", json=conversation_export(2))).raise_for_status()
        imported = await client.post("/api/conversations/import", json=conversation_export(100))
        imported.raise_for_status()
        session_id = imported.json()["session_id"]
    rows = []
    for name, path in (("list", "/api/conversations"), ("get, 100 messages", f"/api/conversations/{session_id}")):
        await http_load.load(base_url, path, 1.0, concurrency)  # warm-up
        result = await http_load.load(base_url, path, seconds, concurrency)
        rows.append(
            (
                f"PostgreSQL {name}: requests/s, p50 / p99 ({concurrency} connections)",
                f"{result.requests_per_second:.0f}, {result.p50_ms:.1f} / {result.p99_ms:.1f} ms"
                + (f", {result.failures} failed" if result.failures else ""),
            )
        )
    return rows


# -- the table ----------------------------------------------------------------------------------------------------


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc")


async def api_rows(server: ChipiServer, model: ModelService, args: argparse.Namespace) -> list[tuple[str, str]]:
    prompt = model.build_prompt(None, [ChatTurn("user", PROMPT)], args.max_tokens)
    long_message = " ".join([LONG_PARAGRAPH] * 40)  # about 1,500 tokens with the chat template
    long_tokens = len(model.build_prompt(None, [ChatTurn("user", long_message)], args.max_tokens).token_ids)
    async with httpx.AsyncClient(base_url=server.url, timeout=600) as client:
        await sse_reply(client, PROMPT)  # warm-up, both sides
        await in_process_reply(model, prompt, 8)
        sse, local, short_ttft, long_ttft = [], [], [], []
        # Interleaved, so that machine noise hits both alike; each run after the other engine has read its last
        # reply's next turn opening ahead (an in-process reply right after an SSE one ran at 232-285 tokens/s against
        # 299-303 alone). The single stream twice as often as the rest: its ratio is the finest the table reads.
        for run in range(2 * args.runs):
            reply = await sse_reply(client, PROMPT)
            sse.append(reply.tokens / reply.seconds)
            short_ttft.append(reply.first_token_seconds)
            await asyncio.sleep(SETTLE_SECONDS)
            tokens, seconds = await in_process_reply(model, prompt, args.max_tokens)
            local.append(tokens / seconds)
            await asyncio.sleep(SETTLE_SECONDS)
            if run % 2 == 0:  # a new opening each time, so that no earlier reply's keys and values help
                reply = await sse_reply(client, f"Run {run}. {long_message}", stop_after_first=True)
                long_ttft.append(reply.first_token_seconds)
                await asyncio.sleep(SETTLE_SECONDS)
    # Turns 1 and 10: medians over conversations that each open differently, so that none reuses another's cache.
    conversations = [(await play({"a": server}, 10, f"Conversation {n}. "))["a"] for n in range(args.conversations)]
    turns = [statistics.median(run[turn] for run in conversations) for turn in (0, -1)]
    sse_rate, local_rate = statistics.median(sse), statistics.median(local)
    rows = [
        ("single stream, SSE endpoint: tokens/s", f"{sse_rate:.1f}"),
        ("single stream, same engine in-process: tokens/s", f"{local_rate:.1f}"),
        ("  SSE / in-process", f"{sse_rate / local_rate:.2f}x"),
    ]
    llama = llama_cpp.rate_in_child(prompt.token_ids, args.max_tokens, args.runs) if llama_cpp.installed() else None
    if not isinstance(llama, float):
        rows.append(("llama.cpp on the same GGUF", llama or "not installed"))
    else:
        rows += [
            ("llama.cpp on the same GGUF: tokens/s", f"{llama:.1f}"),
            ("  SSE / llama.cpp", f"{sse_rate / llama:.2f}x"),
        ]
    rows += [
        ("TTFT, short prompt", f"{statistics.median(short_ttft) * 1000:.0f} ms"),
        (f"TTFT, a {long_tokens}-token message", f"{statistics.median(long_ttft) * 1000:.0f} ms"),
        (
            f"TTFT, turn 1 / turn 10 of a conversation (median of {args.conversations})",
            f"{turns[0] * 1000:.0f} / {turns[-1] * 1000:.0f} ms",
        ),
        ("  turn 10 / turn 1", f"{turns[-1] / turns[0]:.2f}x"),
    ]
    # The levels alternate over --runs rounds (medians), so that a slow spell of the machine does not land on one.
    levels = (1, 4, 8)
    rates: dict[int, list[float]] = {streams: [] for streams in levels}
    for _ in range(args.runs):
        for streams in levels:
            rates[streams].append((await level(server.url, streams))[0])
    base = statistics.median(rates[1])
    for streams in levels:
        rate = statistics.median(rates[streams])
        rows.append(
            (f"{streams} concurrent streams: tokens/s, vs 1 (median of {args.runs})", f"{rate:.1f}, {rate / base:.2f}x")
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--conversations", type=int, default=5)
    parser.add_argument("--load-seconds", type=float, default=10.0)
    parser.add_argument("--load-clients", type=int, default=16)
    args = parser.parse_args()
    settings = Settings.from_env()
    ensure_default_model(settings)
    rows: list[tuple[str, str]] = []
    model = ModelService.load(settings)  # the in-process engine; its load writes the converted model if missing
    try:
        with tempfile.TemporaryDirectory() as tmp:
            server = ChipiServer(
                f"sqlite+aiosqlite:///{tmp}/bench.db",
                CHIPI_MAX_NEW_TOKENS=str(args.max_tokens),
                CHIPI_CONTEXT_WINDOW="0",
                CHIPI_MAX_PROMPT_CHARS="16000",  # the default, for the long message (the test servers allow less)
            )
            started = time.perf_counter()
            server.start()
            rows.append(("process start to ready (models converted)", f"{time.perf_counter() - started:.1f} s"))
            try:
                rows += asyncio.run(api_rows(server, model, args))
                rows += asyncio.run(sampling_rows(model, settings, args))
                assert server.process is not None
                peak = peak_rss_mb(server.process.pid)
                rows.append(("server peak resident memory (LLM, whisper, voice)", f"{peak:.0f} MB"))
            finally:
                server.stop()
    finally:
        model.close()
    with postgres_database() as url, ChipiServer(url, CHIPI_LOG_LEVEL="warning") as postgres_server:
        rows += asyncio.run(http_rows(postgres_server.url, args.load_seconds, args.load_clients))
    print_table(
        f"Chipi on this machine ({os.cpu_count()} CPUs, {settings.model}, greedy, {args.max_tokens}-token replies)",
        rows,
    )


if __name__ == "__main__":
    main()
