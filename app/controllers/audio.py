"""Speech over HTTP: transcription and speech in OpenAI's shape, the installed voices, and spoken chat turns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal
from uuid import UUID

from litestar import Controller, Response, get, post
from litestar.datastructures import UploadFile
from litestar.di import Provide
from litestar.enums import MediaType, RequestEncodingType
from litestar.params import Body, Parameter
from litestar.response import Stream

from app.controllers.auth import KEY_REQUIRED
from app.controllers.conversations import parse_session_id
from app.controllers.openapi import BINARY, TEXT, error_responses, success_content
from app.domain.schemas import SpeechCreate, Transcription, VoiceExchange, VoiceList, message_out
from app.services.chat import ReplyOptions
from app.services.speech import SpeechService, TranscriptionRequest, VoiceChatService

Multipart = Body(media_type=RequestEncodingType.MULTI_PART)


@dataclass
class TranscriptionForm:
    """OpenAI's transcription form. `model` names a checkpoint in models/whisper/ (`whisper-1`: the default)."""

    file: UploadFile
    model: str | None = None
    language: str | None = None
    prompt: str | None = None
    response_format: Literal["json", "verbose_json", "text"] = "json"
    temperature: float | None = None


@dataclass
class VoiceTurnForm:
    """A recorded user turn, with the reply's generation options."""

    file: UploadFile
    language: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None


class AudioController(Controller):
    path = "/api"
    tags = ["audio"]
    security = KEY_REQUIRED

    @post(
        "/audio/transcriptions",
        operation_id="createTranscription",
        summary="Transcribe a recording (WAV, MP3, FLAC, OGG/Opus, WebM/Opus) with whisper",
        description=(
            "`json` and `verbose_json` both give text, language, duration (seconds) and timed segments; "
            "`text` gives the text alone as text/plain. Digital silence transcribes to an empty text."
        ),
        status_code=200,
        responses=error_responses(400, 401, 404, 413),
        operation_class=success_content(("text/plain", TEXT), keep_inferred=True),
    )
    async def create_transcription(
        self, speech: SpeechService, data: Annotated[TranscriptionForm, Multipart]
    ) -> Response[Transcription | str]:
        request = TranscriptionRequest(
            model=data.model, language=data.language, prompt=data.prompt, temperature=data.temperature
        )
        transcript = await speech.transcribe(await data.file.read(), request)
        if data.response_format == "text":
            return Response(transcript.text, media_type=MediaType.TEXT)
        return Response(transcript)

    @post(
        "/audio/speech",
        operation_id="createSpeech",
        summary="Speak text with a Piper voice, streamed sentence by sentence",
        description=(
            "`wav` is a WAV stream whose header's sizes are set for streaming (0xFFFFFFFF), followed by 16-bit mono "
            "PCM, one piece (a sentence, or a clause of a long sentence) at a time as each is synthesized; `pcm` is "
            "the samples alone. The sample rate is the voice's, also in the `X-Sample-Rate` header."
        ),
        status_code=200,
        response_description="A WAV stream (`wav`) or raw PCM (`pcm`)",
        responses=error_responses(400, 401, 404, 413),
        operation_class=success_content(("audio/wav", BINARY), ("audio/pcm", BINARY)),
    )
    async def create_speech(self, speech: SpeechService, data: SpeechCreate) -> Stream:
        audio = await speech.open_speech(data.input, data.voice, data.speed, data.response_format)
        return Stream(audio.chunks, media_type=audio.media_type, headers={"X-Sample-Rate": str(audio.sample_rate)})

    @get("/voices", operation_id="listVoices", summary="The installed Piper voices", responses=error_responses(401))
    async def list_voices(self, speech: SpeechService) -> VoiceList:
        return VoiceList(voices=speech.voices(), default=speech.default_voice)


class VoiceChatController(Controller):
    path = "/api/conversations"
    tags = ["conversations", "audio"]
    security = KEY_REQUIRED
    dependencies = {"conversation_id": Provide(parse_session_id, sync_to_thread=False)}

    @post(
        "/{session_id:str}/voice",
        operation_id="sendVoiceMessage",
        summary="Send a recorded message: it is transcribed, stored as the user's message and replied to",
        description=(
            "The transcript is the stored user message's content. With `reply_audio=true` the reply also comes "
            "spoken, as a base64 WAV file in `reply_audio`."
        ),
        status_code=200,
        responses=error_responses(400, 401, 404, 409, 413),
    )
    async def send_voice_message(
        self,
        voice_chat: VoiceChatService,
        owner: str,
        conversation_id: UUID,
        data: Annotated[VoiceTurnForm, Multipart],
        reply_audio: Annotated[bool, Parameter(description="Also return the reply spoken, as base64 WAV")] = False,
        voice: Annotated[str | None, Parameter(description="The voice that speaks the reply")] = None,
    ) -> VoiceExchange:
        turn = await voice_chat.reply(
            owner,
            conversation_id,
            await data.file.read(),
            ReplyOptions(data.max_tokens, data.temperature, data.top_p),
            language=data.language,
            reply_audio=reply_audio,
            voice=voice,
        )
        return VoiceExchange(
            session_id=conversation_id,
            user_message=message_out(turn.user_message),
            assistant_message=message_out(turn.reply),
            response=turn.reply.content,
            transcript=turn.transcript,
            reply_audio=turn.reply_wav,
            reply_audio_format="wav" if turn.reply_wav is not None else None,
        )
