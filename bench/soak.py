"""Load and soak: many clients at once for a while, then a check of the database and of the server's memory.

    python -m bench.soak [--clients 50] [--seconds 60] [--database postgresql|sqlite] [--max-tokens 32]
                         [--grace 5] [--warmup 20] [--prefix-cache-mb 16]

Starts a real server (PostgreSQL by default, in a fresh database on the server at CHIPI_TEST_POSTGRES_URL; SQLite in
a temporary file with --database sqlite) with the default generation slots and queue, and runs `--clients` clients
at once for `--seconds`. Each client loops over a weighted mix of:
- crud: create a conversation, rename it, read it, list and search, delete it;
- post: POST .../message and wait for the whole reply;
- sse, ws: stream a reply over SSE or the WebSocket to its `done`;
- sse-drop, ws-drop: start a stream and drop the connection after a few tokens (the reply goes on for the grace
  period, then is cancelled; the client moves on to a new conversation);
- cut-body: send half of a POST .../message body and hang up.
Every user message carries a unique marker. When the time is up (and the grace period has passed) the database is
read: each message whose request was accepted is stored exactly once, with exactly one reply; nothing from a
refused or cut request is stored; no reply is left `streaming`. 429 and 503 answers with Retry-After (the model busy)
are counted apart and are not failures (a client then waits a moment and goes on); any other 5xx, a transport error,
an unexpected status or a stream that ends without `done` is one. The server's resident memory is sampled every
second; the table compares the first sample after the warm-up with the last, with the least-squares slope (the
prefix cache is small by default here, so that it is full within the warm-up). Exit status 1 when a check fails,
memory growth over RSS_FLAT_PERCENT included.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import aconnect_sse
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url
from websockets.asyncio.client import connect

from app.assets import ensure_default_model
from app.domain.models import Message
from app.settings import Settings
from bench.report import print_table
from bench.suite import postgres_database
from tests.raw_client import http_request, send_and_hang_up
from tests.server import ChipiServer

PROMPTS = [
    "Name three colors.",
    "Say hello in French.",
    "What is two plus two?",
    "Give me a word that rhymes with cat.",
    "Name a fruit that is yellow.",
    "Write one sentence about the sea.",
]
WEIGHTS = {"crud": 30, "post": 14, "sse": 20, "ws": 14, "sse-drop": 8, "ws-drop": 7, "cut-body": 7}
RSS_FLAT_PERCENT = 5.0  # growth from the first sample after warm-up to the last that still counts as flat


class Failure(Exception):
    """Something a client saw that must not happen (a 5xx, an unexpected answer, a broken stream)."""


@dataclass
class Tally:
    """What the clients did and saw, and every marker they sent, by what became of it."""

    attempted: Counter[str] = field(default_factory=Counter)
    succeeded: Counter[str] = field(default_factory=Counter)
    busy: Counter[str] = field(default_factory=Counter)
    conflicts: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    seconds: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    accepted: dict[str, str] = field(default_factory=dict)  # marker -> conversation: must be stored exactly once
    refused: set[str] = field(default_factory=set)  # markers of refused or cut requests: must never be stored


class Busy(Exception):
    """A 429/503 with Retry-After, or a `busy` frame: the model is saturated, the client waits and goes on."""


class Conflict(Exception):
    """409: a reply still runs in the conversation (one dropped a moment ago); the client takes a new one."""


def _check_refusal(status: int, headers: httpx.Headers | None, body: str) -> None:
    """Raise Busy or Conflict for the refusals a loaded server may give, else Failure."""
    if status in (429, 503) and (headers is None or headers.get("Retry-After")):
        raise Busy()
    if status == 409:
        raise Conflict()
    raise Failure(f"HTTP {status}: {body[:200]}")


class SoakClient:
    """One simulated user: a conversation to chat in, and a loop over the weighted mix until the deadline."""

    def __init__(self, http: httpx.AsyncClient, port: int, tally: Tally, max_tokens: int, rng: random.Random) -> None:
        self.http = http
        self.port = port
        self.tally = tally
        self.max_tokens = max_tokens
        self.rng = rng
        self._conversation: str | None = None  # where this user chats; a new one after a dropped stream

    def _marker(self) -> tuple[str, str]:
        marker = f"#{uuid.uuid4().hex[:12]}"
        return marker, f"{self.rng.choice(PROMPTS)} ({marker})"

    async def _chat(self) -> str:
        if self._conversation is None:
            response = await self.http.post("/api/conversations/new")
            if response.status_code != 201:
                _check_refusal(response.status_code, response.headers, response.text)
            self._conversation = str(response.json()["session_id"])
        return self._conversation

    async def run(self, deadline: float) -> None:
        actions: dict[str, Callable[[], Awaitable[None]]] = {
            "crud": self.crud,
            "post": self.post,
            "sse": lambda: self.sse(drop=False),
            "ws": lambda: self.ws(drop=False),
            "sse-drop": lambda: self.sse(drop=True),
            "ws-drop": lambda: self.ws(drop=True),
            "cut-body": self.cut_body,
        }
        names, weights = list(WEIGHTS), list(WEIGHTS.values())
        while time.monotonic() < deadline:
            name = self.rng.choices(names, weights)[0]
            self.tally.attempted[name] += 1
            started = time.monotonic()
            try:
                await actions[name]()
            except Busy:
                self.tally.busy[name] += 1
                await asyncio.sleep(self.rng.uniform(0.5, 2.0))
                continue
            except Conflict:
                self.tally.conflicts[name] += 1
                self._conversation = None
                continue
            except Failure as exc:
                self.tally.failures.append(f"{name}: {exc}")
                continue
            except Exception as exc:  # a transport error, a socket closed under the client, a malformed answer
                request = (
                    f" ({exc.request.method} {exc.request.url.path})" if isinstance(exc, httpx.RequestError) else ""
                )
                self.tally.failures.append(f"{name}: {type(exc).__name__}{request}: {exc}")
                continue
            self.tally.succeeded[name] += 1
            self.tally.seconds[name].append(time.monotonic() - started)

    async def crud(self) -> None:
        marker = uuid.uuid4().hex[:12]
        created = await self.http.post("/api/conversations/new", params={"title": f"soak {marker}"})
        if created.status_code != 201:
            _check_refusal(created.status_code, created.headers, created.text)
        session_id = created.json()["session_id"]
        steps: list[Callable[[], Awaitable[httpx.Response]]] = [
            lambda: self.http.patch(f"/api/conversations/{session_id}/title", json={"title": f"renamed {marker}"}),
            lambda: self.http.get(f"/api/conversations/{session_id}"),
            lambda: self.http.get("/api/conversations", params={"limit": 20}),
            lambda: self.http.get("/api/conversations", params={"q": f"renamed {marker}", "limit": 5}),
            lambda: self.http.delete(f"/api/conversations/{session_id}"),
        ]
        for step in steps:
            response = await step()
            if response.status_code != 200:
                _check_refusal(response.status_code, response.headers, response.text)

    async def post(self) -> None:
        marker, content = self._marker()
        conversation = await self._chat()
        response = await self.http.post(
            f"/api/conversations/{conversation}/message", json={"content": content, "max_tokens": self.max_tokens}
        )
        if response.status_code == 200:
            self.tally.accepted[marker] = conversation
            if response.json()["assistant_message"]["status"] != "complete":
                raise Failure(f"reply stored as {response.json()['assistant_message']['status']}")
            return
        self.tally.refused.add(marker)
        _check_refusal(response.status_code, response.headers, response.text)

    async def sse(self, *, drop: bool) -> None:
        marker, content = self._marker()
        conversation = await self._chat()
        url = f"/api/conversations/{conversation}/stream"
        async with aconnect_sse(self.http, "GET", url, params={"prompt": content}) as source:
            if source.response.status_code != 200:
                self.tally.refused.add(marker)
                body = (await source.response.aread()).decode(errors="replace")
                _check_refusal(source.response.status_code, source.response.headers, body)
            self.tally.accepted[marker] = conversation
            keep = self.rng.randint(1, 3)
            last = None
            async for event in source.aiter_sse():
                last = event
                if drop and event.event == "message":
                    keep -= 1
                    if keep == 0:
                        break
        if drop:
            self._conversation = None  # the dropped reply runs on there for the grace period
        elif last is None or last.event != "done":
            raise Failure(f"the stream ended with {last.event if last else 'nothing'}: {last.data if last else ''}")

    async def ws(self, *, drop: bool) -> None:
        marker, content = self._marker()
        conversation = await self._chat()
        url = str(self.http.base_url).replace("http://", "ws://") + f"/api/conversations/{conversation}/ws"
        async with connect(url, open_timeout=60) as socket:
            await socket.send(json.dumps({"type": "message", "content": content, "max_tokens": self.max_tokens}))
            keep = self.rng.randint(1, 3)
            while True:
                frame = json.loads(await asyncio.wait_for(socket.recv(), 120))
                kind = frame["type"]
                if kind == "user_message":
                    self.tally.accepted[marker] = conversation
                elif kind == "error" and marker not in self.tally.accepted:
                    self.tally.refused.add(marker)
                    if frame["code"] in ("busy", "not_ready"):
                        raise Busy()
                    if frame["code"] == "conflict":
                        raise Conflict()
                    raise Failure(f"error frame {frame}")
                elif kind == "error":
                    raise Failure(f"error frame mid-reply {frame}")
                elif kind == "done":
                    return
                elif kind == "token" and drop:
                    keep -= 1
                    if keep == 0:
                        socket.transport.abort()  # gone without a close frame
                        break
        self._conversation = None

    async def cut_body(self) -> None:
        marker, content = self._marker()
        self.tally.refused.add(marker)
        body = json.dumps({"content": content}).encode()
        path = f"/api/conversations/{await self._chat()}/message"
        request = http_request(
            "POST", path, body[: len(body) // 2], content_length=len(body), Content_Type="application/json"
        )
        await send_and_hang_up(self.port, request, linger=0.2, reset=True)


# -- memory -------------------------------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc")


async def sample_rss(pid: int, samples: list[tuple[float, float]], started: float) -> None:
    while True:
        samples.append((time.monotonic() - started, rss_mb(pid)))
        await asyncio.sleep(1)


def slope_mb_per_minute(samples: list[tuple[float, float]]) -> float:
    if len(samples) < 2:
        return 0.0
    return statistics.linear_regression([t for t, _ in samples], [mb for _, mb in samples]).slope * 60


# -- the check against the database ------------------------------------------------------------------------------


@dataclass
class StoredCheck:
    lost: list[str]
    duplicated: list[str]
    stored_though_refused: list[str]
    without_one_reply: list[str]
    streaming: int
    replies: Counter[str]
    completion_tokens: int


def sync_url(url: str) -> str:
    parsed = make_url(url)
    driver = "sqlite" if parsed.get_backend_name() == "sqlite" else "postgresql+psycopg"  # psycopg 3 is both
    return parsed.set(drivername=driver).render_as_string(hide_password=False)


def streaming_count(url: str) -> int:
    engine = create_engine(sync_url(url))
    try:
        with engine.connect() as connection:
            return int(connection.execute(text("SELECT count(*) FROM message WHERE status = 'streaming'")).scalar_one())
    finally:
        engine.dispose()


def check_database(url: str, tally: Tally) -> StoredCheck:
    engine = create_engine(sync_url(url))
    try:
        with engine.connect() as connection:
            columns = (Message.id, Message.conversation_id, Message.parent_id, Message.role, Message.content)
            rows = connection.execute(select(*columns, Message.status, Message.completion_tokens)).all()
    finally:
        engine.dispose()
    marker_pattern = re.compile(r"\((#[0-9a-f]{12})\)$")
    users: dict[str, list[Any]] = defaultdict(list)
    replies_to: Counter[str] = Counter()
    replies: Counter[str] = Counter()
    for row in rows:
        if row.role == "user" and (found := marker_pattern.search(row.content)):
            users[found.group(1)].append(row)
        elif row.role == "assistant":
            replies_to[str(row.parent_id)] += 1
            replies[row.status] += 1
    lost = [m for m, conversation in tally.accepted.items() if not users.get(m)]
    duplicated = [m for m in tally.accepted if len(users.get(m, [])) > 1]
    misplaced = [m for m, c in tally.accepted.items() if any(str(r.conversation_id) != c for r in users.get(m, []))]
    refused_stored = [m for m in tally.refused if m not in tally.accepted and users.get(m)]
    without_one_reply = [m for m, stored in users.items() for r in stored if replies_to[str(r.id)] != 1]
    return StoredCheck(
        lost=lost + misplaced,
        duplicated=duplicated,
        stored_though_refused=refused_stored,
        without_one_reply=without_one_reply,
        streaming=sum(1 for row in rows if row.status == "streaming"),
        replies=replies,
        completion_tokens=sum(row.completion_tokens or 0 for row in rows if row.role == "assistant"),
    )


def server_errors_in_log(log: Path) -> tuple[int, int]:
    """5xx lines other than 503 in the access log (text format), and tracebacks."""
    content = log.read_text(errors="replace")
    return len(re.findall(r'" 5(?!03)\d\d \d', content)), content.count("Traceback")


# -- the run ------------------------------------------------------------------------------------------------------


@contextmanager
def soak_database(kind: str) -> Iterator[str]:
    if kind == "postgresql":
        with postgres_database() as url:
            yield url
    else:
        with tempfile.TemporaryDirectory() as tmp:
            yield f"sqlite+aiosqlite:///{tmp}/soak.db"


async def load(server: ChipiServer, args: argparse.Namespace, tally: Tally) -> list[tuple[float, float]]:
    assert server.process is not None
    samples: list[tuple[float, float]] = []
    started = time.monotonic()
    sampler = asyncio.create_task(sample_rss(server.process.pid, samples, started))
    n = args.clients
    # Idle connections are let go before uvicorn's 5 s keep-alive ends, so no request races the server's close.
    limits = httpx.Limits(max_connections=n * 2, max_keepalive_connections=n, keepalive_expiry=2)
    async with httpx.AsyncClient(base_url=server.url, timeout=180, limits=limits) as http:
        clients = [
            SoakClient(http, server.port, tally, args.max_tokens, random.Random(args.seed + i))
            for i in range(args.clients)
        ]
        deadline = started + args.seconds
        await asyncio.gather(*(client.run(deadline) for client in clients))
    sampler.cancel()
    return samples


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--database", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument("--max-tokens", type=int, default=32, help="CHIPI_MAX_NEW_TOKENS, and what clients ask for")
    parser.add_argument("--grace", type=float, default=5, help="CHIPI_DISCONNECT_GRACE_SECONDS")
    parser.add_argument("--warmup", type=float, default=20, help="seconds of load before memory counts as warm")
    parser.add_argument(
        "--prefix-cache-mb",
        type=int,
        default=16,
        help="CHIPI_PREFIX_CACHE_MB: the cache grows up to its budget (256 MB by default), growth that stops there; "
        "a small one is full within the warm-up, so that memory growth after it would be a leak",
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    ensure_default_model(Settings.from_env())
    tally = Tally()
    with (
        soak_database(args.database) as url,
        tempfile.TemporaryDirectory() as tmp,
        (Path(tmp) / "server.log").open("wb") as log,
        ChipiServer(
            url,
            stderr=log,
            CHIPI_MAX_NEW_TOKENS=str(args.max_tokens),
            CHIPI_DISCONNECT_GRACE_SECONDS=str(args.grace),
            CHIPI_LOG_LEVEL="info",
            CHIPI_LOG_FORMAT="text",
            CHIPI_PREFIX_CACHE_MB=str(args.prefix_cache_mb),
        ) as server,
    ):
        assert server.process is not None
        run_started = time.monotonic()
        samples = asyncio.run(load(server, args, tally))
        run_seconds = time.monotonic() - run_started
        settle_deadline = time.monotonic() + args.grace + 120  # replies dropped at the end run out their grace
        while streaming_count(url) and time.monotonic() < settle_deadline:
            time.sleep(0.5)
        alive = server.process.poll() is None
        stored = check_database(url, tally)
        log_5xx, tracebacks = server_errors_in_log(Path(tmp) / "server.log")

    warm = [s for s in samples if s[0] >= args.warmup] or samples
    first, last, peak = warm[0][1], warm[-1][1], max(mb for _, mb in samples)
    growth = (last - first) / first * 100
    slope = slope_mb_per_minute(warm)
    total = sum(tally.attempted.values())
    latency = [s for name in ("post", "sse", "ws") for s in tally.seconds[name]]
    rows = [
        ("clients, database", f"{args.clients}, {args.database}"),
        ("seconds of load (+ finishing those in flight)", f"{args.seconds:.0f} (+{run_seconds - args.seconds:.0f})"),
        ("actions attempted / succeeded", f"{total} / {sum(tally.succeeded.values())}"),
        *[
            (
                f"  {name}: attempted / ok / busy / 409",
                f"{tally.attempted[name]} / {tally.succeeded[name]} / {tally.busy[name]} / {tally.conflicts[name]}",
            )
            for name in WEIGHTS
        ],
        ("busy answers (429/503 + Retry-After)", str(sum(tally.busy.values()))),
        ("failures (5xx, transport, unexpected)", str(len(tally.failures))),
        ("5xx other than 503 in the server log", str(log_5xx)),
        ("tracebacks in the server log", str(tracebacks)),
        ("user messages accepted", str(len(tally.accepted))),
        ("  lost", str(len(stored.lost))),
        ("  duplicated", str(len(stored.duplicated))),
        ("  without exactly one reply", str(len(stored.without_one_reply))),
        ("refused or cut, yet stored", str(len(stored.stored_though_refused))),
        ("replies stored by status", ", ".join(f"{k} {v}" for k, v in sorted(stored.replies.items()))),
        ("left streaming after the grace period", str(stored.streaming)),
        ("completion tokens stored", f"{stored.completion_tokens} ({stored.completion_tokens / run_seconds:.1f}/s)"),
        (
            "reply latency p50 / p95 (post, sse, ws)",
            f"{percentile(latency, 0.5):.1f} / {percentile(latency, 0.95):.1f} s",
        ),
        ("server RSS after warm-up -> last", f"{first:,.0f} -> {last:,.0f} MB ({growth:+.1f}%)"),
        ("server RSS peak", f"{peak:,.0f} MB"),
        ("server RSS slope after warm-up", f"{slope:+.1f} MB/min"),
        ("server RSS every 10 s (MB)", " ".join(f"{mb:.0f}" for t, mb in samples if round(t) % 10 == 0)),
        ("server still running", "yes" if alive else "NO"),
    ]
    print_table(f"Chipi soak: {args.clients} clients, {args.seconds:.0f} s, {args.database}", rows)
    problems = {
        "failures": len(tally.failures),
        "5xx in the log": log_5xx,
        "tracebacks": tracebacks,
        "lost": len(stored.lost),
        "duplicated": len(stored.duplicated),
        "without one reply": len(stored.without_one_reply),
        "stored though refused": len(stored.stored_though_refused),
        "left streaming": stored.streaming,
        "server died": int(not alive),
        f"RSS grew more than {RSS_FLAT_PERCENT}%": int(growth > RSS_FLAT_PERCENT),
    }
    for failure in tally.failures[:10]:
        print(f"  failure: {failure}")
    failed = {name: count for name, count in problems.items() if count}
    print(f"\n{'FAILED: ' + ', '.join(f'{k} ({v})' for k, v in failed.items()) if failed else 'all checks passed'}")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
