"""The server-sent events the streaming endpoints encode themselves: byte for byte what Litestar's encoder sends."""

from __future__ import annotations

import pytest
from litestar.response import ServerSentEventMessage

from app.controllers.sse import sse_event

TEXTS = ["", "Hello", " world", "two\nlines", "crlf\r\nand cr\rend", "\n", "trailing\n\n", "ünïcödé ✓", '{"a": 1}']


@pytest.mark.parametrize("data", TEXTS)
@pytest.mark.parametrize(("event", "event_id"), [(None, None), (None, "0190:3"), ("done", "0190:12"), ("error", None)])
def test_an_event_is_encoded_as_litestar_encodes_it(data: str, event: str | None, event_id: str | None) -> None:
    assert (
        sse_event(data, event=event, event_id=event_id)
        == ServerSentEventMessage(data=data, event=event, id=event_id).encode()
    )
