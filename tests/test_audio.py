"""Speech-to-text and text-to-speech over HTTP, with the real whisper tiny.en and Piper voice.

These endpoints never touch the database, so they run against the SQLite server only.
"""

from __future__ import annotations

import os
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.audio_samples import (
    CONTAINERS,
    duration,
    encode,
    silence_wav,
    speak,
    word_error_rate,
    word_errors,
    words,
)
from tests.server import ROOT, TEST_MAX_AUDIO_BYTES, TEST_MAX_AUDIO_SECONDS

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

SENTENCE = "The quick brown fox jumps over the lazy dog."

# The round trip text -> Piper -> whisper -> text, over everyday sentences without numbers (whisper writes those
# as digits, which would count as errors that are not).
ROUND_TRIP_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call me back when you get home tonight.",
    "The weather today is sunny with a light breeze.",
    "I would like a cup of coffee with milk and sugar.",
    "Our meeting has been moved to Thursday afternoon.",
    "She reads a book every night before going to sleep.",
    "The train to the city is running late this morning.",
    "Can you tell me the way to the nearest library?",
    "We planted tomatoes and beans in the garden last spring.",
    "Thank you very much for your help with the project.",
    "The children played football in the park after school.",
    "Remember to turn off the lights when you leave the room.",
]


async def transcribe(client: httpx.AsyncClient, audio: bytes, name: str = "audio", **fields: str) -> httpx.Response:
    return await client.post("/api/audio/transcriptions", files={"file": (name, audio)}, data=fields)


def assert_error(response: httpx.Response, status: int, field: str | None = None) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, object] = response.json()
    assert body["status_code"] == status and body["detail"]
    if field is not None:
        assert body["field"] == field, body
    return body


# Speech-to-text


@pytest.mark.parametrize("container", list(CONTAINERS))
async def test_each_container_format_is_transcribed(client: httpx.AsyncClient, container: str) -> None:
    recording = encode(await speak(client, SENTENCE), container)
    response = await transcribe(client, recording, f"speech.{container}")
    assert response.status_code == 200, response.text
    body = response.json()
    assert word_error_rate(SENTENCE, body["text"]) <= 0.15, body["text"]
    assert body["language"] == "en"
    assert abs(body["duration"] - duration(recording)) < 0.1
    segments = body["segments"]
    assert segments and all(0 <= s["start"] < s["end"] <= body["duration"] + 0.5 for s in segments)
    assert " ".join(s["text"] for s in segments) == body["text"]


async def test_openai_fields_and_response_formats(client: httpx.AsyncClient) -> None:
    recording = await speak(client, SENTENCE)
    as_text = await transcribe(client, recording, response_format="text", model="whisper-1", language="en")
    assert as_text.status_code == 200 and as_text.headers["content-type"].startswith("text/plain")
    verbose = await transcribe(
        client, recording, response_format="verbose_json", model="tiny.en", language="English", temperature="0.2"
    )
    assert verbose.status_code == 200, verbose.text
    assert set(verbose.json()) >= {"text", "language", "duration", "segments"}
    assert word_error_rate(SENTENCE, as_text.text) <= 0.15 and word_error_rate(SENTENCE, verbose.json()["text"]) <= 0.15
    prompted = await transcribe(client, recording, prompt="A typing exercise about a fox.")
    assert prompted.status_code == 200 and word_error_rate(SENTENCE, prompted.json()["text"]) <= 0.15


async def test_the_speech_round_trip_word_error_rate_is_at_most_15_percent(client: httpx.AsyncClient) -> None:
    errors = total = 0
    heard = []
    for sentence in ROUND_TRIP_SENTENCES:
        response = await transcribe(client, await speak(client, sentence))
        assert response.status_code == 200, response.text
        heard.append(response.json()["text"])
        errors += word_errors(sentence, heard[-1])
        total += len(words(sentence))
    wer = errors / total
    print(f"round-trip WER over {len(ROUND_TRIP_SENTENCES)} sentences: {wer:.1%} ({errors}/{total} words)")
    assert wer <= 0.15, list(zip(ROUND_TRIP_SENTENCES, heard, strict=True))


async def test_digital_silence_transcribes_to_empty_text(client: httpx.AsyncClient) -> None:
    response = await transcribe(client, silence_wav(2.0), "silence.wav")
    assert response.status_code == 200, response.text
    assert response.json() == {"text": "", "language": "en", "duration": 2.0, "segments": []}


@pytest.mark.parametrize(
    "audio",
    [
        pytest.param(os.urandom(4096), id="garbage-bytes"),
        pytest.param(b"", id="empty-file"),
        pytest.param(b"RIFF\x24\x00\x00\x00WAVEfmt ", id="truncated-header"),
        pytest.param(silence_wav(0), id="no-samples"),
        pytest.param(b"\x89PNG\r\n\x1a\n" + bytes(64), id="not-audio"),
    ],
)
async def test_undecodable_or_empty_audio_is_400(client: httpx.AsyncClient, audio: bytes) -> None:
    body = assert_error(await transcribe(client, audio), 400, field="file")
    assert "file" in str(body["detail"])


async def test_a_recording_over_the_size_limit_is_413(client: httpx.AsyncClient) -> None:
    assert_error(await transcribe(client, os.urandom(TEST_MAX_AUDIO_BYTES + 1)), 413, field="file")


async def test_a_recording_longer_than_the_limit_is_413(client: httpx.AsyncClient) -> None:
    long_silence = silence_wav(TEST_MAX_AUDIO_SECONDS + 1, rate=8000)  # small in bytes, long in seconds
    assert len(long_silence) < TEST_MAX_AUDIO_BYTES
    assert_error(await transcribe(client, long_silence), 413, field="file")


@pytest.mark.parametrize("name", ["tiny", "large-v3", "../SmolLM2-135M-Instruct/model", "/etc/passwd", "tiny.en.pt"])
async def test_an_unknown_whisper_model_is_404(client: httpx.AsyncClient, name: str) -> None:
    body = assert_error(await transcribe(client, silence_wav(1), model=name), 404, field="model")
    assert "tiny.en" in str(body["detail"])  # the installed models are named


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"language": "klingon"}, "language"),
        ({"language": "fr"}, "language"),  # tiny.en transcribes English only
        ({"temperature": "1.5"}, "temperature"),
        ({"temperature": "warm"}, "temperature"),
        ({"response_format": "srt"}, "response_format"),
    ],
)
async def test_bad_transcription_options_are_400(client: httpx.AsyncClient, fields: dict[str, str], field: str) -> None:
    assert_error(await transcribe(client, silence_wav(1), **fields), 400, field=field)


async def test_a_request_without_a_file_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/audio/transcriptions", files={"other": ("a", b"x")}, data={"model": "tiny.en"})
    assert_error(response, 400)


@pytest.fixture
def dropped_in_whisper_model() -> Iterator[str]:
    """Another checkpoint dropped into models/whisper/ (a link to tiny.en's), picked up by its name."""
    name = f"chipi-test-{uuid.uuid4().hex[:8]}"
    link = ROOT / "models" / "whisper" / f"{name}.pt"
    link.symlink_to((ROOT / "models" / "whisper" / "tiny.en.pt").resolve())
    try:
        yield name
    finally:
        link.unlink()


async def test_a_whisper_checkpoint_dropped_into_the_folder_is_used_by_name(
    client: httpx.AsyncClient, dropped_in_whisper_model: str
) -> None:
    response = await transcribe(client, await speak(client, SENTENCE), model=dropped_in_whisper_model)
    assert response.status_code == 200, response.text
    assert word_error_rate(SENTENCE, response.json()["text"]) <= 0.15


# Text-to-speech


def parse_streamed_wav(body: bytes) -> tuple[int, bytes]:
    """The sample rate and PCM of a streamed WAV: a 44-byte 16-bit mono header with streaming sizes, then PCM."""
    riff, riff_size, wave, fmt, fmt_size, codec, channels, rate, byte_rate, align, bits, data, data_size = (
        struct.unpack("<4sI4s4sIHHIIHH4sI", body[:44])
    )
    assert (riff, wave, fmt, data) == (b"RIFF", b"WAVE", b"fmt ", b"data")
    assert (fmt_size, codec, channels, bits, align, byte_rate) == (16, 1, 1, 16, 2, rate * 2)
    assert riff_size == data_size == 0xFFFFFFFF  # sized for streaming: the length is not known up front
    return rate, body[44:]


async def test_speech_streams_a_wav_piece_by_piece(client: httpx.AsyncClient) -> None:
    text = " ".join(ROUND_TRIP_SENTENCES[:8])
    arrivals: list[tuple[float, int]] = []
    body = b""
    started = time.perf_counter()
    async with client.stream("POST", "/api/audio/speech", json={"input": text, "voice": "en_US-joe-medium"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "audio/wav" and r.headers["x-sample-rate"] == "22050"
        async for chunk in r.aiter_raw():
            arrivals.append((time.perf_counter() - started, len(chunk)))
            body += chunk
    rate, pcm = parse_streamed_wav(body)
    assert rate == 22050 and len(pcm) % 2 == 0 and len(pcm) / 2 / rate > 10
    # The first audio came while the rest of the text was still being synthesized, not all at the end.
    first_audio = next(at for at, _ in _after_header(arrivals))
    assert first_audio < 0.6 * arrivals[-1][0], arrivals
    # ... and what streamed is the whole text, spoken.
    heard = (await transcribe(client, body, "streamed.wav")).json()["text"]
    assert word_error_rate(text, heard) <= 0.15, heard


def _after_header(arrivals: list[tuple[float, int]]) -> Iterator[tuple[float, int]]:
    seen = 0
    for at, size in arrivals:
        seen += size
        if seen > 44:
            yield at, size


async def test_speech_as_raw_pcm_and_at_another_speed(client: httpx.AsyncClient) -> None:
    normal = await client.post("/api/audio/speech", json={"input": SENTENCE, "response_format": "pcm"})
    fast = await client.post("/api/audio/speech", json={"input": SENTENCE, "response_format": "pcm", "speed": 2.0})
    assert normal.status_code == fast.status_code == 200
    assert normal.headers["content-type"] == "audio/pcm" and normal.headers["x-sample-rate"] == "22050"
    assert not normal.content.startswith(b"RIFF") and len(normal.content) % 2 == 0
    assert 0.35 < len(fast.content) / len(normal.content) < 0.7


async def test_the_installed_voices_are_listed(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/voices")
    assert response.status_code == 200
    body = response.json()
    assert body["default"] == "en_US-joe-medium"
    joe = next(v for v in body["voices"] if v["name"] == "en_US-joe-medium")
    assert joe == {
        "name": "en_US-joe-medium",
        "language": "en_US",
        "quality": "medium",
        "sample_rate": 22050,
        "default": True,
    }


@pytest.fixture
def dropped_in_voice() -> Iterator[str]:
    """Another Piper voice dropped into voices/ (links to joe's files), picked up by its name."""
    name = f"chipi-test-{uuid.uuid4().hex[:8]}"
    links = [ROOT / "voices" / f"{name}{suffix}" for suffix in (".onnx", ".onnx.json")]
    for link, suffix in zip(links, (".onnx", ".onnx.json"), strict=True):
        link.symlink_to(Path(ROOT / "voices" / f"en_US-joe-medium{suffix}").resolve())
    try:
        yield name
    finally:
        for link in links:
            link.unlink()


async def test_a_voice_dropped_into_the_folder_is_listed_and_speaks(
    client: httpx.AsyncClient, dropped_in_voice: str
) -> None:
    listed = (await client.get("/api/voices")).json()["voices"]
    assert {"name": dropped_in_voice, "default": False}.items() <= next(
        v for v in listed if v["name"] == dropped_in_voice
    ).items()
    heard = await transcribe(client, await speak(client, SENTENCE, voice=dropped_in_voice))
    assert word_error_rate(SENTENCE, heard.json()["text"]) <= 0.15


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"input": SENTENCE, "voice": "en_GB-nobody-low"}, 404, "voice"),
        ({"input": SENTENCE, "voice": "../models/whisper/tiny.en"}, 404, "voice"),
        ({"input": ""}, 400, "input"),
        ({"input": "   \n "}, 400, "input"),
        ({"input": "... --- !!!"}, 400, "input"),
        ({"input": "a" * 4097}, 413, "input"),
        ({"input": SENTENCE, "response_format": "mp3"}, 400, "response_format"),
        ({"input": SENTENCE, "speed": 10}, 400, "speed"),
        ({"input": SENTENCE, "speed": 0}, 400, "speed"),
        ({"voice": "en_US-joe-medium"}, 400, None),
        ({"input": SENTENCE, "pitch": 2}, 400, None),
    ],
)
async def test_bad_speech_requests_are_json_errors(
    client: httpx.AsyncClient, body: dict[str, object], status: int, field: str | None
) -> None:
    assert_error(await client.post("/api/audio/speech", json=body), status, field=field)


async def test_every_audio_route_is_documented(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/schema/openapi.json")).json()["paths"]
    routes = {
        ("/api/audio/transcriptions", "post"): {"400", "404", "413"},
        ("/api/audio/speech", "post"): {"400", "404", "413"},
        ("/api/voices", "get"): set(),
        ("/api/conversations/{session_id}/voice", "post"): {"400", "404", "413"},
    }
    for (path, method), errors in routes.items():
        operation = paths[path][method]
        assert operation["operationId"] and errors <= set(operation["responses"]), (path, operation["responses"])
