"""Server-sent events: each encoded once, as bytes, for a plain streaming response.

A reply streams tens of events a second while the model computes on the same cores, so an event costs one join
here. (Litestar's ServerSentEvent builds each one through a StringIO and regular expressions, and hands every
response's opening chunks to a worker thread.) The bytes are what it sends: `id`, `event`, then one `data` line per
line of the data, each line ended by CRLF, and a blank line.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable

from litestar.response import Stream

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
# No caching, and no proxy buffering (nginx reads X-Accel-Buffering), so each event reaches the client as it is sent.
_HEADERS = {"Cache-Control": "no-cache", "Connection": "keep-alive", "X-Accel-Buffering": "no"}


def sse_event(data: str, *, event: str | None = None, event_id: str | None = None) -> bytes:
    """One event; `event` and `event_id` must be single lines (ours are names and `reply:seq` ids)."""
    head = ""
    if event_id is not None:
        head += f"id: {event_id}\r\n"
    if event is not None:
        head += f"event: {event}\r\n"
    if "\n" in data or "\r" in data:
        data = "\r\ndata: ".join(_LINE_BREAK.split(data))
    return f"{head}data: {data}\r\n\r\n".encode()


def event_stream(events: AsyncIterable[bytes]) -> Stream:
    """A `text/event-stream` response of already encoded events."""
    return Stream(events, media_type="text/event-stream", headers=_HEADERS)
