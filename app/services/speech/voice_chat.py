"""VoiceChatService: a spoken turn in a conversation: hear the recording, reply to it, speak the reply."""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from app.domain.errors import InvalidInputError
from app.domain.models import Message
from app.domain.schemas import Transcription
from app.services.chat import ChatService, ReplyOptions
from app.services.conversations import NewMessage
from app.services.speech.service import SpeechService, TranscriptionRequest


@dataclass(frozen=True)
class VoiceTurn:
    """The transcript, the stored user message (the transcript as its content), the reply, and its audio."""

    transcript: Transcription
    user_message: Message
    reply: Message
    reply_wav: bytes | None


class VoiceChatService:
    def __init__(self, chat: ChatService, speech: SpeechService) -> None:
        self.chat = chat
        self.speech = speech

    async def hear(
        self,
        owner: str,
        conversation_id: UUID,
        audio: bytes,
        *,
        language: str | None,
        format_hint: str | None,
        field: str,
    ) -> Transcription:
        """The recording's transcript, which becomes the user's message; hearing no words is a 400."""
        await self.chat.check_conversation(owner, conversation_id)  # a 404 before whisper spends any time
        request = TranscriptionRequest(language=language, format_hint=format_hint)
        transcript = await self.speech.transcribe(audio, request, field=field)
        if not transcript.text:
            raise InvalidInputError(f"no speech was recognised in {field}", field=field)
        return transcript

    async def reply(
        self,
        owner: str,
        conversation_id: UUID,
        audio: bytes,
        options: ReplyOptions,
        *,
        language: str | None = None,
        reply_audio: bool = False,
        voice: str | None = None,
    ) -> VoiceTurn:
        """Transcribe, store the transcript as the user's message, generate the whole reply, and speak it if asked."""
        piper_voice = await self.speech.voice(voice) if reply_audio else None  # an unknown voice: 404 before anything
        transcript = await self.hear(owner, conversation_id, audio, language=language, format_hint=None, field="file")
        user_message, reply = await self.chat.reply(owner, conversation_id, NewMessage(transcript.text), options)
        wav = await self.speech.speak(reply.content, piper_voice) if piper_voice else None
        return VoiceTurn(transcript, user_message, reply, wav)
