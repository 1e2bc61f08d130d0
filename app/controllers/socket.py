"""The chat WebSocket: one socket per conversation, JSON frames both ways (see app/domain/frames.py)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any
from uuid import UUID

import msgspec
from litestar import WebSocket, websocket
from litestar.di import Provide
from litestar.exceptions import WebSocketDisconnect

from app.controllers.conversations import parse_session_id
from app.domain.errors import ChipiError
from app.domain.frames import (
    ClientFrame,
    DoneFrame,
    ErrorFrame,
    HeartbeatFrame,
    MessageFrame,
    ReasoningFrame,
    RegenerateFrame,
    ResumeFrame,
    ServerFrame,
    StopFrame,
    TokenFrame,
    UserMessageFrame,
)
from app.domain.reasoning import Piece
from app.domain.schemas import StreamDone, StreamError, message_out
from app.services.chat import ChatService, Generation, ReplyOptions
from app.services.conversations import NewMessage, Regenerate, TurnRequest
from app.settings import Settings

_decode_frame = msgspec.json.Decoder(ClientFrame).decode
_encode_frame = msgspec.json.Encoder().encode


class ChatSocket:
    """One client's socket: reads frames, forwards the reply it follows, and keeps the line alive."""

    def __init__(
        self, socket: WebSocket[Any, Any, Any], chat: ChatService, conversation_id: UUID, heartbeat_seconds: float
    ) -> None:
        self._socket = socket
        self._chat = chat
        self._conversation_id = conversation_id
        self._heartbeat_seconds = heartbeat_seconds
        self._send_lock = asyncio.Lock()
        self._forwarder: asyncio.Task[None] | None = None

    async def serve(self) -> None:
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            while True:
                await self._handle(await self._socket.receive_text())
        except WebSocketDisconnect:
            pass  # a dropped client is not a stop: the reply goes on for the grace period
        finally:
            heartbeat.cancel()
            if self._forwarder is not None:
                self._forwarder.cancel()

    async def send(self, frame: ServerFrame) -> None:
        async with self._send_lock:
            await self._socket.send_text(_encode_frame(frame).decode())

    async def _handle(self, raw: str) -> None:
        try:
            frame = _decode_frame(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            await self.send(ErrorFrame(code="invalid_frame", detail=str(exc)))
            return
        try:
            await self._dispatch(frame)
        except ChipiError as exc:
            await self.send(ErrorFrame(code=exc.code, detail=exc.detail))

    async def _dispatch(self, frame: ClientFrame) -> None:
        if isinstance(frame, MessageFrame):
            options = ReplyOptions(frame.max_tokens, frame.temperature, frame.top_p, frame.thinking)
            await self._start(NewMessage(frame.content), options)
        elif isinstance(frame, RegenerateFrame):
            await self._start(
                Regenerate(frame.message_id), ReplyOptions(frame.max_tokens, frame.temperature, frame.top_p)
            )
        elif isinstance(frame, StopFrame):
            await self._chat.stop(self._conversation_id)  # the forwarder then sends `done` (cancelled)
        elif isinstance(frame, ResumeFrame):
            self._forward(*self._chat.watch(self._conversation_id, after=frame.last_seq))

    async def _start(self, request: TurnRequest, options: ReplyOptions) -> None:
        generation = await self._chat.start_reply(self._conversation_id, request, options)
        await self.send(UserMessageFrame(message=message_out(generation.user_message)))
        self._forward(generation, 0)

    def _forward(self, generation: Generation, after: int) -> None:
        if self._forwarder is not None:
            self._forwarder.cancel()
        self._forwarder = asyncio.create_task(self._forward_events(generation, after))

    async def _forward_events(self, generation: Generation, after: int) -> None:
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):  # the client left mid-reply
            async for seq, event in generation.follow(after):
                if isinstance(event, Piece):
                    if event.kind == "content":
                        await self.send(TokenFrame(text=event.text, seq=seq))
                    elif event.kind == "reasoning":
                        await self.send(ReasoningFrame(text=event.text, seq=seq))
                elif isinstance(event, StreamDone):
                    await self.send(
                        DoneFrame(
                            message=message_out(generation.reply),
                            usage=event.usage,
                            finish_reason=event.finish_reason,
                            seq=seq,
                        )
                    )
                elif isinstance(event, StreamError):
                    await self.send(ErrorFrame(code=event.code, detail=event.detail))

    async def _heartbeat(self) -> None:
        """An application-level frame on idle sockets, so proxies that drop quiet connections keep this one."""
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):
            while True:
                await asyncio.sleep(self._heartbeat_seconds)
                await self.send(HeartbeatFrame())


@websocket(
    "/api/conversations/{session_id:str}/ws",
    dependencies={"conversation_id": Provide(parse_session_id, sync_to_thread=False)},
)
async def chat_socket(
    socket: WebSocket[Any, Any, Any], chat: ChatService, settings: Settings, conversation_id: UUID
) -> None:
    """Chat over one socket per conversation; frames are documented in app/domain/frames.py and the README."""
    await socket.accept()
    try:
        await chat.check_conversation(conversation_id)
    except ChipiError as exc:
        await socket.send_text(_encode_frame(ErrorFrame(code=exc.code, detail=exc.detail)).decode())
        await socket.close(code=4404, reason="conversation not found")
        return
    await ChatSocket(socket, chat, conversation_id, settings.ws_heartbeat_seconds).serve()
