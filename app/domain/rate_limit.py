"""A per-client request budget: the generic cell rate algorithm (GCRA), kept in memory.

Each client may send `per_minute` requests in any rolling minute, all at once if it likes; after that, one more
each `60 / per_minute` seconds. Only one number is kept per client (when its budget is next full again), and
clients whose budget is full are forgotten, so memory stays bounded by the clients seen in the last minute.
"""

from __future__ import annotations

import time
from collections.abc import Callable

WINDOW_SECONDS = 60.0
_MIN_PRUNE_SIZE = 1024


class RateLimiter:
    """Counts requests per client identity and says how long a client over its budget must wait."""

    def __init__(self, per_minute: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1")
        self.per_minute = per_minute
        self._interval = WINDOW_SECONDS / per_minute
        self._clock = clock
        self._full_at: dict[str, float] = {}  # per client: when its whole budget is available again
        self._prune_above = _MIN_PRUNE_SIZE

    def acquire(self, client: str) -> float:
        """Count a request: 0.0 when it may go ahead, else the seconds until one would (it is then not counted)."""
        now = self._clock()
        full_at = max(self._full_at.get(client, now), now)
        allowed_from = full_at + self._interval - WINDOW_SECONDS
        if allowed_from > now:
            return allowed_from - now
        self._full_at[client] = full_at + self._interval
        if len(self._full_at) > self._prune_above:
            self._forget_idle(now)
        return 0.0

    def remaining(self, client: str) -> int:
        """Requests the client could send right now."""
        used = max(self._full_at.get(client, 0.0) - self._clock(), 0.0)
        return max(self.per_minute - int(-(-used // self._interval)), 0)

    def __len__(self) -> int:
        return len(self._full_at)

    def _forget_idle(self, now: float) -> None:
        """Drop clients whose budget is whole again: they are as good as never seen."""
        self._full_at = {client: full_at for client, full_at in self._full_at.items() if full_at > now}
        self._prune_above = max(_MIN_PRUNE_SIZE, 2 * len(self._full_at))
