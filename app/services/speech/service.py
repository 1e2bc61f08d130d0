"""SpeechService: speech-to-text with openai-whisper and text-to-speech with Piper, loaded once per process.

Whisper checkpoints are picked up by name from models/whisper/NAME.pt and Piper voices from voices/NAME.onnx (with
NAME.onnx.json beside it). Names are looked up among the files those folders hold, never joined into a path, so no
name can reach outside them. The configured model and voice are loaded at start; others on first use, then kept.

Whisper and Piper run in worker threads, never on the event loop. One transcription runs at a time (whisper's
key-value cache hooks are installed on the shared model per call, so two calls at once would mix their caches;
on a CPU they would only share the cores anyway), and one synthesis at a time, taken piece by piece, so that
concurrent speech streams interleave instead of queueing whole texts.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import numpy as np

from app.domain.errors import InvalidInputError, NotFoundError, TooLargeError
from app.domain.schemas import Transcription, TranscriptSegment, VoiceOut
from app.domain.sentences import SentenceSplitter, clauses, speakable, speech_pieces
from app.services.own_thread import run_in_own_thread
from app.services.speech.codec import (
    WHISPER_SAMPLE_RATE,
    Samples,
    decode_audio,
    pcm16,
    wav_file,
    wav_header,
)
from app.settings import VOICES_DIR, WHISPER_DIR, Settings

if TYPE_CHECKING:
    from piper import PiperVoice
    from whisper.model import Whisper

logger = logging.getLogger(__name__)

T = TypeVar("T")

OPENAI_WHISPER_ALIAS = "whisper-1"  # what OpenAI's clients send; it means the configured model here
SPEECH_FORMATS = {"wav": "audio/wav", "pcm": "audio/pcm"}  # pcm: raw 16-bit little-endian mono samples
MIN_SPEED, MAX_SPEED = 0.25, 4.0
# Peak amplitude below which a recording counts as silence (-60 dBFS): whisper is not run on it, since it tends
# to make up words for silence.
SILENCE_PEAK = 1e-3


@dataclass(frozen=True)
class TranscriptionRequest:
    """How to transcribe; None means the default (the configured model, the model's language)."""

    model: str | None = None
    language: str | None = None
    prompt: str | None = None
    temperature: float | None = None
    format_hint: str | None = None


@dataclass(frozen=True)
class SpeechStream:
    """Speech being synthesized: its media type and sample rate, and the bytes as each piece is ready."""

    media_type: str
    sample_rate: int
    chunks: AsyncIterator[bytes]


@dataclass(frozen=True)
class SpokenPiece:
    """One piece of a reply, spoken: its place (from 0), its text, and its audio as a complete WAV file."""

    index: int
    text: str
    wav: bytes


def _installed(folder: str, suffix: str, companion: str | None = None) -> dict[str, Path]:
    """The files `NAME{suffix}` in `folder` by NAME (with `NAME{suffix}{companion}` beside them, if given)."""
    found: dict[str, Path] = {}
    for path in sorted(Path(folder).glob(f"*{suffix}")):
        if path.is_file() and (companion is None or path.with_name(path.name + companion).is_file()):
            found[path.name.removesuffix(suffix)] = path
    return found


def _torch_device(setting: str) -> str:
    if setting != "auto":
        return setting
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _voice_on_gpu(setting: str) -> bool:
    """Whether Piper voices run on the GPU. They run on onnxruntime, not PyTorch: with `auto`, where onnxruntime has
    CUDA (asking PyTorch would wait for its import, which the model's loading thread holds for seconds)."""
    if setting != "auto":
        return setting.startswith("cuda")
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


class SpeechService:
    """Transcribes recordings and speaks text; holds the loaded whisper models and Piper voices."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._whisper: dict[str, Whisper] = {}
        self._voices: dict[str, PiperVoice] = {}
        self._stt = anyio.CapacityLimiter(1)
        self._tts = anyio.CapacityLimiter(1)

    @functools.cached_property
    def _device(self) -> str:
        """whisper's PyTorch device."""
        return _torch_device(self._settings.device)

    @classmethod
    def load(cls, settings: Settings) -> SpeechService:
        """The service with the configured whisper model and voice loaded (blocking: call it from a thread).

        The voice first: it needs no PyTorch, and onnxruntime builds its session without holding the GIL, so at a
        server's start it loads on the second core while the model's loading thread imports PyTorch (about a second
        of a start on a slow CPU)."""
        service = cls(settings)
        voice = service._voice(service._voice_path(settings.voice, field="CHIPI_VOICE"))
        list(voice.synthesize("Ready."))  # the first run of an ONNX session is slow: not on a user's request
        service._whisper_model(service._whisper_path(settings.whisper_model, field="CHIPI_WHISPER_MODEL"))
        logger.info("speech ready: whisper %s on %s, voice %s", settings.whisper_model, service._device, settings.voice)
        return service

    @property
    def default_voice(self) -> str:
        return self._settings.voice

    # Names -> files

    def _whisper_path(self, name: str | None, *, field: str = "model") -> Path:
        wanted = self._settings.whisper_model if name in (None, "", OPENAI_WHISPER_ALIAS) else name
        installed = _installed(WHISPER_DIR, ".pt")
        if wanted not in installed:
            names = ", ".join(installed) or "none"
            raise NotFoundError(f"no whisper model {wanted!r} is installed (installed: {names})", field=field)
        return installed[wanted]

    def _voice_path(self, name: str | None, *, field: str = "voice") -> Path:
        wanted = name or self._settings.voice
        installed = _installed(VOICES_DIR, ".onnx", companion=".json")
        if wanted not in installed:
            names = ", ".join(installed) or "none"
            raise NotFoundError(f"no voice {wanted!r} is installed (installed: {names})", field=field)
        return installed[wanted]

    def voices(self) -> list[VoiceOut]:
        """The installed Piper voices, described from their config files."""
        voices = []
        for name, path in _installed(VOICES_DIR, ".onnx", companion=".json").items():
            try:
                config: dict[str, Any] = json.loads(path.with_name(path.name + ".json").read_text("utf-8"))
                audio = config.get("audio", {})
                language = config.get("language", {}).get("code") or config.get("espeak", {}).get("voice")
                voices.append(
                    VoiceOut(
                        name, language, audio.get("quality"), int(audio["sample_rate"]), name == self._settings.voice
                    )
                )
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                logger.warning("skipping voice %s: its config %s.json is unreadable", name, path)
        return voices

    # Loading (in worker threads, under the limiter of the kind of work)

    def _whisper_model(self, path: Path) -> Whisper:
        if path.stem not in self._whisper:
            import whisper

            self._whisper[path.stem] = whisper.load_model(str(path), device=self._device)
        return self._whisper[path.stem]

    def _voice(self, path: Path) -> PiperVoice:
        name = path.name.removesuffix(".onnx")
        if name not in self._voices:
            from piper import PiperVoice

            self._voices[name] = PiperVoice.load(path, use_cuda=_voice_on_gpu(self._settings.device))
        return self._voices[name]

    async def _run(self, limiter: anyio.CapacityLimiter, work: Callable[..., T], *args: Any) -> T:
        async with limiter:
            return await run_in_own_thread(work, *args)  # not a pooled thread: see app/services/own_thread.py

    # Speech-to-text

    async def transcribe(self, data: bytes, request: TranscriptionRequest, *, field: str = "file") -> Transcription:
        """What is said in a recording (any container PyAV decodes); bad input is a 400, too much a 413."""
        if len(data) > self._settings.max_audio_bytes:
            raise TooLargeError(
                f"{field} is {len(data)} bytes; the limit is {self._settings.max_audio_bytes}", field=field
            )
        path = self._whisper_path(request.model)
        temperatures = self._temperatures(request.temperature)
        return await self._run(self._stt, self._transcribe, data, path, request, temperatures, field)

    def _temperatures(self, temperature: float | None) -> tuple[float, ...]:
        """Whisper's fallback: decode at `temperature`, and retry hotter (up to 1) when the output looks wrong."""
        start = 0.0 if temperature is None else temperature
        if not 0 <= start <= 1:
            raise InvalidInputError("temperature must be between 0 and 1", field="temperature")
        return tuple(round(float(t), 2) for t in np.arange(start, 1.0 + 1e-9, 0.2))

    def _transcribe(
        self, data: bytes, path: Path, request: TranscriptionRequest, temperatures: tuple[float, ...], field: str
    ) -> Transcription:
        model = self._whisper_model(path)
        language = self._language(model, request.language)
        samples = decode_audio(
            data, max_seconds=self._settings.max_audio_seconds, field=field, format_hint=request.format_hint
        )
        duration = round(samples.size / WHISPER_SAMPLE_RATE, 3)
        if float(np.abs(samples).max()) < SILENCE_PEAK:
            return Transcription(text="", language=language or "en", duration=duration, segments=[])
        result = self._whisper_transcribe(model, samples, language, request.prompt, temperatures)
        segments = [
            TranscriptSegment(
                id=int(s["id"]),
                start=round(float(s["start"]), 3),
                end=round(float(s["end"]), 3),
                text=str(s["text"]).strip(),
                avg_logprob=float(s["avg_logprob"]),
                no_speech_prob=float(s["no_speech_prob"]),
            )
            for s in result["segments"]
        ]
        return Transcription(
            text=str(result["text"]).strip(), language=str(result["language"]), duration=duration, segments=segments
        )

    def _whisper_transcribe(
        self,
        model: Whisper,
        samples: Samples,
        language: str | None,
        prompt: str | None,
        temperatures: tuple[float, ...],
    ) -> dict[str, Any]:
        import whisper

        result: dict[str, Any] = whisper.transcribe(
            model,
            samples,
            language=language,
            initial_prompt=prompt or None,
            temperature=temperatures,
            fp16=self._device.startswith("cuda"),
            verbose=None,  # False would still draw a progress bar
        )
        return result

    @staticmethod
    def _language(model: Whisper, language: str | None) -> str | None:
        """A language code whisper knows (a code or an English name); None lets a multilingual model detect it."""
        from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE

        if not language:
            return None if model.is_multilingual else "en"
        code = language.strip().lower()
        code = str(TO_LANGUAGE_CODE.get(code, code))
        if code not in LANGUAGES:
            raise InvalidInputError(f"language {language!r} is not one whisper knows", field="language")
        if not model.is_multilingual and code != "en":
            raise InvalidInputError("this whisper model transcribes English only", field="language")
        return code

    # Text-to-speech

    async def open_speech(self, text: str, voice: str | None, speed: float, response_format: str) -> SpeechStream:
        """Speech for `text`, streamed piece by piece (a sentence, or a clause of a long one) as each is ready.

        Everything is checked before the first byte, so a bad request is an error response, not a broken stream.
        """
        if not text or not text.strip():
            raise InvalidInputError("input must not be empty", field="input")
        if len(text) > self._settings.max_speech_chars:
            raise TooLargeError(
                f"input is {len(text)} characters; the limit is {self._settings.max_speech_chars}", field="input"
            )
        if response_format not in SPEECH_FORMATS:
            raise InvalidInputError(
                f"response_format must be one of {', '.join(SPEECH_FORMATS)}", field="response_format"
            )
        if not MIN_SPEED <= speed <= MAX_SPEED:
            raise InvalidInputError(f"speed must be between {MIN_SPEED} and {MAX_SPEED}", field="speed")
        pieces = [spoken for piece in speech_pieces(text) if (spoken := speakable(piece))]
        if not pieces:
            raise InvalidInputError("input has no words to speak", field="input")
        piper_voice = await self.voice(voice)
        rate = piper_voice.config.sample_rate

        async def chunks() -> AsyncIterator[bytes]:
            if response_format == "wav":
                yield wav_header(rate)  # sized for streaming: the length is not known yet
            for piece in pieces:
                yield await self.synthesize(piper_voice, piece, speed)

        return SpeechStream(SPEECH_FORMATS[response_format], rate, chunks())

    async def voice(self, name: str | None) -> PiperVoice:
        """A loaded voice by name (None: the configured one); unknown names are a 404."""
        path = self._voice_path(name)
        loaded = self._voices.get(path.name.removesuffix(".onnx"))
        if loaded is not None:
            return loaded
        return await self._run(self._tts, self._voice, path)

    async def speak(self, text: str, voice: PiperVoice) -> bytes:
        """`text` spoken as one complete WAV file."""
        pcm = [await self.synthesize(voice, piece) for piece in speech_pieces(text)]
        return wav_file(b"".join(pcm), voice.config.sample_rate)

    def speaker(self, voice: PiperVoice) -> SentenceSpeaker:
        return SentenceSpeaker(self, voice)

    async def synthesize(self, voice: PiperVoice, text: str, speed: float = 1.0) -> bytes:
        """One piece of text as 16-bit mono PCM at the voice's sample rate (nothing if it has no words)."""
        return await self._run(self._tts, self._synthesize, voice, speakable(text), speed)

    @staticmethod
    def _synthesize(voice: PiperVoice, text: str, speed: float) -> bytes:
        from piper.config import SynthesisConfig

        config = SynthesisConfig(length_scale=voice.config.length_scale / speed)
        return b"".join(pcm16(chunk.audio_float_array) for chunk in voice.synthesize(text, config)) if text else b""


class SentenceSpeaker:
    """Speaks text that arrives bit by bit (a streamed reply), each sentence as soon as it is complete."""

    def __init__(self, speech: SpeechService, voice: PiperVoice) -> None:
        self._speech = speech
        self._voice = voice
        self._splitter = SentenceSplitter()
        self._pieces: asyncio.Queue[str | None] = asyncio.Queue()

    def feed(self, text: str) -> None:
        self._queue(self._splitter.feed(text))

    def close(self, *, speak_rest: bool = True) -> None:
        """No more text is coming: speak the rest, or (a stopped reply) stop after the piece being spoken."""
        if speak_rest:
            self._queue(self._splitter.flush())
        else:
            while not self._pieces.empty():
                self._pieces.get_nowait()
        self._pieces.put_nowait(None)

    def _queue(self, sentences: list[str]) -> None:
        for sentence in sentences:
            for piece in clauses(sentence):
                if speakable(piece):
                    self._pieces.put_nowait(piece)

    async def spoken(self) -> AsyncIterator[SpokenPiece]:
        """Each piece as a WAV file, in order, until close() and the last piece is spoken."""
        index = 0
        while (piece := await self._pieces.get()) is not None:
            pcm = await self._speech.synthesize(self._voice, piece)
            yield SpokenPiece(index, piece, wav_file(pcm, self._voice.config.sample_rate))
            index += 1
