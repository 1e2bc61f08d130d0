"""Clients misbehaving below what httpx allows: requests cut mid-body, sockets dropped without a goodbye, readers
that stall. Plain sockets and asyncio streams."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
from dataclasses import dataclass


async def send_and_hang_up(port: int, request: bytes, *, linger: float = 0.0, reset: bool = False) -> None:
    """Write `request` (possibly less than its headers announce), wait `linger` seconds, then close the connection
    without reading a byte: with FIN (what was sent still arrives) or, with `reset`, RST (what the server has not
    read yet may be dropped)."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    if linger:
        await asyncio.sleep(linger)
    if reset:
        writer.transport.abort()
    else:
        writer.close()


def http_request(
    method: str, path: str, body: bytes = b"", *, content_length: int | None = None, **headers: str
) -> bytes:
    """An HTTP/1.1 request; `content_length` may announce more than `body` holds (an upload cut short)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    if body or content_length is not None:
        lines.append(f"Content-Length: {content_length if content_length is not None else len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def multipart_upload(field: str, filename: str, data: bytes, boundary: str = "chipi-boundary") -> tuple[bytes, str]:
    """A multipart/form-data body holding one file, and its Content-Type."""
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    body += data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


async def open_websocket(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket handshake by hand, so the test can then write frames as broken as it likes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        http_request(
            "GET", path, Upgrade="websocket", Connection="Upgrade", Sec_WebSocket_Key=key, Sec_WebSocket_Version="13"
        )
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


def websocket_text_frame_header(length: int) -> bytes:
    """The header of a masked client text frame of `length` bytes, with its mask key (then the masked payload)."""
    return struct.pack("!BBQ", 0x81, 0x80 | 127, length) + b"\0\0\0\0"  # an all-zero mask leaves the payload as is


@dataclass
class SseEvent:
    event: str
    data: str
    id: str


def parse_sse_response(raw: bytes) -> tuple[int, list[SseEvent]]:
    """Status and events of a whole HTTP/1.1 SSE response (chunked or not) read until the server closed."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        decoded = b""
        while body:
            size_line, _, rest = body.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            decoded += rest[:size]
            body = rest[size + 2 :]
        body = decoded
    events = []
    for block in body.decode().replace("\r\n", "\n").split("\n\n"):
        if not block.strip():
            continue
        fields: dict[str, list[str]] = {}
        for line in block.split("\n"):
            name, _, value = line.partition(":")
            fields.setdefault(name, []).append(value[1:] if value.startswith(" ") else value)
        events.append(
            SseEvent(
                event=fields.get("event", ["message"])[0], data="\n".join(fields.get("data", [])), id=fields["id"][0]
            )
        )
    return status, events


class StalledReader:
    """An SSE client with a tiny receive buffer that reads nothing until told to, then reads in small sips."""

    def __init__(self, port: int, path: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(http_request("GET", path, Connection="close", Accept="text/event-stream"))
        self.sock.setblocking(False)

    async def read_slowly(self, sip: int = 256, pause: float = 0.01) -> bytes:
        """Everything up to the server's close, `sip` bytes at a time."""
        loop = asyncio.get_running_loop()
        received = b""
        while chunk := await loop.sock_recv(self.sock, sip):
            received += chunk
            await asyncio.sleep(pause)
        self.sock.close()
        return received
