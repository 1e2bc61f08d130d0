"""Time to first token as one conversation grows, with and without the prefix cache.

    python -m bench.turns [--turns 10] [--conversations 3] [--max-tokens 64]

Starts two real servers (uvicorn subprocesses, SQLite, greedy), one with CHIPI_PREFIX_CACHE_MB=0, and plays the
same conversations on both, turn by turn, alternating between them so that machine noise hits both alike. Prints
the median time to first token at turn 1 and at the last turn, the ratio between them, and the ratio of the last
turn with the cache to the last turn without it.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile

import httpx

from app.assets import ensure_default_model
from app.settings import Settings
from bench.client import stream_reply
from bench.report import print_table
from tests.server import ChipiServer

QUESTIONS = [
    "Tell me about the history of bread.",
    "How did people bake it in ancient Egypt?",
    "And in medieval Europe?",
    "What changed with industrial mills?",
    "Which grains are used today?",
    "How is sourdough different?",
    "Give me a simple recipe.",
    "How long should it rise?",
    "What if my kitchen is cold?",
    "Summarise our conversation.",
]


async def first_token_seconds(client: httpx.AsyncClient, session_id: str, prompt: str) -> float:
    """Send one turn and read its reply to the end; the time until its first token."""
    return (await stream_reply(client, session_id, prompt)).first_token_seconds


async def play(servers: dict[str, ChipiServer], turns: int, opening: str = "") -> dict[str, list[float]]:
    """One conversation of `turns` turns on each server; the time to first token of each turn. A distinct
    `opening` (before the first question) keeps a conversation from reusing another's keys and values."""
    clients = {name: httpx.AsyncClient(base_url=server.url, timeout=300) for name, server in servers.items()}
    try:
        sessions = {name: (await c.post("/api/conversations/new")).json()["session_id"] for name, c in clients.items()}
        ttfts: dict[str, list[float]] = {name: [] for name in servers}
        for turn in range(turns):
            question = QUESTIONS[turn % len(QUESTIONS)]
            if turn == 0:
                question = opening + question
            for name, client in clients.items():
                ttfts[name].append(await first_token_seconds(client, sessions[name], question))
        return ttfts
    finally:
        for client in clients.values():
            await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--conversations", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    ensure_default_model(Settings.from_env())
    max_tokens = str(args.max_tokens)
    with (
        tempfile.TemporaryDirectory() as tmp,
        ChipiServer(f"sqlite+aiosqlite:///{tmp}/a.db", CHIPI_MAX_NEW_TOKENS=max_tokens, CHIPI_CONTEXT_WINDOW="0") as on,
        ChipiServer(
            f"sqlite+aiosqlite:///{tmp}/b.db",
            CHIPI_MAX_NEW_TOKENS=max_tokens,
            CHIPI_CONTEXT_WINDOW="0",
            CHIPI_PREFIX_CACHE_MB="0",
        ) as off,
    ):
        servers = {"cached": on, "plain": off}
        asyncio.run(play(servers, 1, "Hello. "))  # warm-up, in a conversation of its own
        runs = [asyncio.run(play(servers, args.turns, f"Conversation {n}. ")) for n in range(args.conversations)]
    last = args.turns
    ms = {
        name: [statistics.median(run[name][turn] for run in runs) * 1000 for turn in (0, last - 1)]
        for name in ("cached", "plain")
    }
    print_table(
        f"Time to first token as a conversation grows (median of {args.conversations} conversations, "
        f"{args.max_tokens}-token replies, greedy)",
        [
            ("prefix cache: turn 1", f"{ms['cached'][0]:.0f} ms"),
            (f"prefix cache: turn {last}", f"{ms['cached'][1]:.0f} ms"),
            (f"turn {last} / turn 1", f"{ms['cached'][1] / ms['cached'][0]:.2f}x"),
            ("no prefix cache: turn 1", f"{ms['plain'][0]:.0f} ms"),
            (f"no prefix cache: turn {last}", f"{ms['plain'][1]:.0f} ms"),
            (f"turn {last} / turn 1", f"{ms['plain'][1] / ms['plain'][0]:.2f}x"),
            (f"turn {last}: cache / none", f"{ms['cached'][1] / ms['plain'][1]:.2f}x"),
        ],
    )


if __name__ == "__main__":
    main()
