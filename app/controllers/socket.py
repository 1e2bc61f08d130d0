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
from app.controllers.errors import describe_error, refuse_socket
from app.db import database_unavailable
from app.domain.errors import ChipiError
from app.domain.frames import (
    AudioDoneFrame,
    AudioFrame,
    AudioMessageFrame,
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
    TranscriptFrame,
    UserMessageFrame,
)
from app.domain.reasoning import Piece
from app.domain.schemas import message_out
from app.services.chat import ChatEvent, ChatService, Generation, ReplyFailed, ReplyFinished, ReplyOptions
from app.services.conversations import NewMessage, Regenerate, TurnRequest
from app.services.speech import SentenceSpeaker, VoiceChatService
from app.settings import Settings

_decode_frame = msgspec.json.Decoder(ClientFrame).decode
_encode_frame = msgspec.json.Encoder().encode


def _error_frame(exc: Exception) -> ErrorFrame:
    """An error as a frame, through the one error mapper."""
    info = describe_error(exc)
    return ErrorFrame(code=info.code, detail=info.detail)


class ChatSocket:
    """One client's socket: reads frames, forwards the reply it follows, and keeps the line alive."""

    def __init__(
        self,
        socket: WebSocket[Any, Any, Any],
        chat: ChatService,
        voice_chat: VoiceChatService,
        owner: str,
        conversation_id: UUID,
        heartbeat_seconds: float,
    ) -> None:
        self._socket = socket
        self._owner = owner
        self._chat = chat
        self._voice_chat = voice_chat
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
        except Exception as exc:
            if not isinstance(exc, ChipiError) and not database_unavailable(exc):
                raise  # e.g. the client is gone
            await self.send(_error_frame(exc))  # mapped as for HTTP; the socket stays usable

    async def _dispatch(self, frame: ClientFrame) -> None:
        if isinstance(frame, MessageFrame):
            options = ReplyOptions(frame.max_tokens, frame.temperature, frame.top_p, frame.thinking)
            await self._start(NewMessage(frame.content), options)
        elif isinstance(frame, AudioMessageFrame):
            await self._start_spoken(frame)
        elif isinstance(frame, RegenerateFrame):
            await self._start(
                Regenerate(frame.message_id), ReplyOptions(frame.max_tokens, frame.temperature, frame.top_p)
            )
        elif isinstance(frame, StopFrame):
            await self._chat.stop(self._owner, self._conversation_id)  # the forwarder then sends `done` (cancelled)
        elif isinstance(frame, ResumeFrame):
            self._forward(*self._chat.watch(self._owner, self._conversation_id, after=frame.last_seq))

    async def _start(self, request: TurnRequest, options: ReplyOptions, speaker: SentenceSpeaker | None = None) -> None:
        generation = await self._chat.start_reply(self._owner, self._conversation_id, request, options)
        assert generation.user_message is not None  # a reply in a conversation has its stored user message
        await self.send(UserMessageFrame(message=message_out(generation.user_message)))
        self._forward(generation, 0, speaker)

    async def _start_spoken(self, frame: AudioMessageFrame) -> None:
        """A recorded message: transcribe it, then reply as to a typed one, speaking the reply if asked."""
        speech = self._voice_chat.speech
        voice = await speech.voice(frame.voice) if frame.reply_audio else None  # an unknown voice: error first
        transcript = await self._voice_chat.hear(
            self._owner,
            self._conversation_id,
            frame.data,
            language=frame.language,
            format_hint=frame.format,
            field="data",
        )
        await self.send(
            TranscriptFrame(text=transcript.text, language=transcript.language, duration=transcript.duration)
        )
        options = ReplyOptions(frame.max_tokens, frame.temperature, frame.top_p, frame.thinking)
        await self._start(NewMessage(transcript.text), options, speech.speaker(voice) if voice else None)

    def _forward(self, generation: Generation, after: int, speaker: SentenceSpeaker | None = None) -> None:
        if self._forwarder is not None:
            self._forwarder.cancel()
        self._forwarder = asyncio.create_task(self._forward_events(generation, after, speaker))

    async def _forward_events(self, generation: Generation, after: int, speaker: SentenceSpeaker | None) -> None:
        # The reply's sentences are spoken beside the token stream, each as soon as its text is complete.
        speaking = asyncio.create_task(self._speak(speaker)) if speaker else None
        try:
            last = await self._forward_text(generation, after, speaker)
            if speaker and speaking:
                # A finished reply is spoken to its end; a stopped or failed one (or a client gone) stops speaking.
                speaker.close(speak_rest=isinstance(last, ReplyFinished) and last.finish_reason != "cancelled")
                await speaking
        finally:
            if speaking:
                speaking.cancel()

    async def _speak(self, speaker: SentenceSpeaker) -> None:
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):
            count = 0
            async for piece in speaker.spoken():
                await self.send(AudioFrame(index=piece.index, text=piece.text, data=piece.wav))
                count += 1
            await self.send(AudioDoneFrame(count=count))

    async def _forward_text(
        self, generation: Generation, after: int, speaker: SentenceSpeaker | None
    ) -> ChatEvent | None:
        """Forward the reply's events; the last one forwarded (None if the client left first)."""
        last: ChatEvent | None = None
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):  # the client left mid-reply
            async for seq, event in generation.follow(after):
                if isinstance(event, Piece):
                    if event.kind == "content":
                        await self.send(TokenFrame(text=event.text, seq=seq))
                        if speaker:
                            speaker.feed(event.text)
                    elif event.kind == "reasoning":
                        await self.send(ReasoningFrame(text=event.text, seq=seq))
                elif isinstance(event, ReplyFinished):
                    assert generation.reply is not None
                    reply = message_out(generation.reply)
                    await self.send(
                        DoneFrame(message=reply, usage=event.usage, finish_reason=event.finish_reason, seq=seq)
                    )
                elif isinstance(event, ReplyFailed):
                    await self.send(ErrorFrame(code=event.code, detail=event.detail))
                last = event
        return last

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
    socket: WebSocket[Any, Any, Any],
    chat: ChatService,
    voice_chat: VoiceChatService,
    settings: Settings,
    owner: str,
    conversation_id: UUID,
) -> None:
    """Chat over one socket per conversation; frames are documented in app/domain/frames.py and the README.

    The key (when keys are in use) was checked before this runs (app/controllers/auth.py); another owner's
    conversation is refused like an unknown one."""
    await socket.accept()
    try:
        await chat.check_conversation(owner, conversation_id)
    except Exception as exc:
        await refuse_socket(socket, exc)  # 4404: no such conversation; 1013: e.g. the database is down
        return
    await ChatSocket(socket, chat, voice_chat, owner, conversation_id, settings.ws_heartbeat_seconds).serve()
