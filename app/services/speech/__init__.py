"""Speech: SpeechService (whisper speech-to-text, Piper text-to-speech) and VoiceChatService (spoken turns)."""

from app.services.speech.service import SentenceSpeaker, SpeechService, SpeechStream, SpokenPiece, TranscriptionRequest
from app.services.speech.voice_chat import VoiceChatService, VoiceTurn

__all__ = [
    "SentenceSpeaker",
    "SpeechService",
    "SpeechStream",
    "SpokenPiece",
    "TranscriptionRequest",
    "VoiceChatService",
    "VoiceTurn",
]
