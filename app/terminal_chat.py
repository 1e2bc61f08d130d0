"""`chipi chat`: a terminal client of a running Chipi server that streams replies as the model writes them.

It talks to the public API only (the SSE stream endpoint), as any other client would. Ctrl-C during a reply asks
the server to stop it (the partial reply is kept as cancelled); `/new`, `/list`, `/open ID`, `/quit`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any, TextIO

import httpx

HELP = "/new: start a new conversation  /list: recent conversations  /open ID: continue one  /quit: leave"


class ChatClientError(Exception):
    """The server refused a request or could not be reached; the message says why."""


def _error_detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}"
    detail = body.get("detail") if isinstance(body, dict) else None
    return f"HTTP {response.status_code}: {detail or body}"


def _sse_events(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """(event, data) for each server-sent event; several `data:` lines are one value joined by newlines."""
    event, data = "message", list[str]()
    for line in lines:
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
        elif line.startswith("event:"):
            event = line[6:].strip()
    if data:
        yield event, "\n".join(data)


class TerminalChat:
    """One REPL session against the server at `url`, in conversation `session_id` (a new one if None), sending
    `api_key` as a bearer token when given."""

    def __init__(
        self, url: str, session_id: str | None, out: TextIO = sys.stdout, *, api_key: str | None = None
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=httpx.Timeout(30, read=None))
        self._session_id = session_id
        self._out = out

    def _say(self, text: str = "", end: str = "\n") -> None:
        print(text, end=end, file=self._out, flush=True)

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ChatClientError(f"cannot reach {self._http.base_url}: {exc}") from exc
        if response.is_error:
            raise ChatClientError(_error_detail(response))
        return response.json()

    def run(self) -> None:
        """Read lines until /quit or end of input."""
        try:
            if self._session_id:
                self.open(self._session_id)
            self._say(f"connected to {self._http.base_url}; type a message, or {HELP}")
            while True:
                try:
                    line = input("you> ").strip()
                except EOFError:
                    self._say()
                    return
                except KeyboardInterrupt:
                    self._say()
                    continue
                if line and not self._command(line):
                    return
        finally:
            self._http.close()

    def _command(self, line: str) -> bool:
        """Handle one input line; False means quit."""
        try:
            if line in ("/quit", "/exit"):
                return False
            if line == "/new":
                self._session_id = None
                self._say("(a new conversation starts with your next message)")
            elif line == "/list":
                self.list_conversations()
            elif line.startswith("/open "):
                self.open(line.removeprefix("/open ").strip())
            elif line.startswith("/"):
                self._say(HELP)
            else:
                self.send(line)
        except ChatClientError as exc:
            self._say(f"error: {exc}")
        return True

    def open(self, session_id: str) -> None:
        conversation = self._request("GET", f"/api/conversations/{session_id}")
        self._session_id = session_id
        title, count = conversation["conversation"]["title"], len(conversation["messages"])
        self._say(f"conversation {session_id}: {title} ({count} messages)")

    def list_conversations(self) -> None:
        page = self._request("GET", "/api/conversations", params={"limit": 20})
        for item in page["conversations"]:
            self._say(f"{item['session_id']}  {item['updated_at'][:19]}  {item['title']}")
        self._say(f"({len(page['conversations'])} of {page['total']})")

    def send(self, prompt: str) -> None:
        """Stream the reply to `prompt`; Ctrl-C stops it on the server."""
        if self._session_id is None:
            created = self._request("POST", "/api/conversations/new")
            self._session_id = created["session_id"]
            self._say(f"(new conversation {self._session_id})")
        path = f"/api/conversations/{self._session_id}/stream"
        self._say("chipi> ", end="")
        try:
            with self._http.stream("GET", path, params={"prompt": prompt}) as response:
                if response.is_error:
                    response.read()
                    self._say()
                    raise ChatClientError(_error_detail(response))
                self._follow(_sse_events(response.iter_lines()))
        except KeyboardInterrupt:
            self._request("POST", f"/api/conversations/{self._session_id}/stop")
            self._say(" [stopped]")
        except httpx.TransportError as exc:
            self._say()
            raise ChatClientError(f"the stream broke off: {exc}") from exc

    def _follow(self, events: Iterator[tuple[str, str]]) -> None:
        for event, data in events:
            if event == "message":
                self._say(data, end="")
            elif event == "done":
                reason = json.loads(data).get("finish_reason")
                self._say("" if reason == "stop" else f" [{reason}]")
                return
            elif event == "error":
                self._say()
                raise ChatClientError(json.loads(data).get("detail", data))
        self._say()
