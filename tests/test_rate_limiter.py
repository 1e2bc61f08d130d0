"""The per-client request budget (app/domain/rate_limit.py) and whose budget a request spends."""

from __future__ import annotations

import uuid

import pytest

from app.controllers.rate_limit import client_identity, is_rate_limited_path
from app.domain.auth import LOCAL_CALLER, Caller
from app.domain.rate_limit import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_whole_budget_may_be_spent_at_once_then_one_request_per_interval() -> None:
    clock = Clock()
    limiter = RateLimiter(6, clock=clock)  # one request back every 10 s
    assert [limiter.acquire("a") for _ in range(6)] == [0.0] * 6
    assert limiter.acquire("a") == pytest.approx(10.0)
    assert limiter.remaining("a") == 0
    clock.now += 9.5
    assert limiter.acquire("a") == pytest.approx(0.5)  # a refused request is not counted
    clock.now += 0.5
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("a") == pytest.approx(10.0)


def test_clients_have_budgets_of_their_own_and_a_quiet_minute_restores_one() -> None:
    clock = Clock()
    limiter = RateLimiter(2, clock=clock)
    assert limiter.acquire("a") == 0.0 and limiter.acquire("a") == 0.0
    assert limiter.acquire("a") > 0
    assert limiter.acquire("b") == 0.0
    clock.now += 60
    assert limiter.remaining("a") == 2
    assert limiter.acquire("a") == 0.0 and limiter.acquire("a") == 0.0


def test_remaining_counts_down() -> None:
    limiter = RateLimiter(3, clock=Clock())
    assert limiter.remaining("a") == 3
    limiter.acquire("a")
    assert limiter.remaining("a") == 2


def test_memory_holds_only_the_clients_of_the_last_minute() -> None:
    clock = Clock()
    limiter = RateLimiter(60, clock=clock)
    for index in range(5000):
        limiter.acquire(f"client-{index}")
        clock.now += 0.05  # 250 s in all: clients older than a minute are forgotten as new ones come
    assert len(limiter) <= 2 * (60 / 0.05)


def test_the_identity_is_the_authenticated_key_else_the_address() -> None:
    key_id = uuid.uuid4()
    authenticated = {"user": Caller("alice", key_id), "client": ("10.0.0.1", 5000)}
    assert client_identity(authenticated) == f"key:{key_id}"  # type: ignore[arg-type]
    # a key sent while authentication is off (everyone is the local owner) is not a budget of its own
    local = {"user": LOCAL_CALLER, "headers": [(b"authorization", b"Bearer made-up")], "client": ("10.0.0.1", 5000)}
    assert client_identity(local) == "address:10.0.0.1"  # type: ignore[arg-type]
    assert client_identity({"client": ("10.0.0.2", 1)}) == "address:10.0.0.2"  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("path", "limited"),
    [
        ("/api/conversations", True),
        ("/api/conversations/x/stream", True),
        ("/v1/chat/completions", True),
        ("/api/ping", False),
        ("/api/health", False),
        ("/metrics", False),
        ("/", False),
        ("/app.js", False),
        ("/schema/openapi.json", False),
    ],
)
def test_what_is_counted(path: str, limited: bool) -> None:
    assert is_rate_limited_path(path) is limited
