"""Real recordings for the speech tests: Piper speech from the server, re-encoded with PyAV like a client would.

Browsers' MediaRecorder produces WebM/Opus; phones and tools send WAV, MP3, FLAC or OGG/Opus. Every sample starts
as the server's own speech (POST /api/audio/speech) and is encoded here into the container under test.
"""

from __future__ import annotations

import io
import re
import struct

import av
import httpx
import numpy as np

# container -> (FFmpeg muxer, audio codec, sample rate; None keeps the voice's 22050 Hz). Opus runs at 48 kHz.
CONTAINERS: dict[str, tuple[str, str, int | None]] = {
    "wav": ("wav", "pcm_s16le", None),
    "mp3": ("mp3", "libmp3lame", None),
    "flac": ("flac", "flac", None),
    "ogg-opus": ("ogg", "libopus", 48_000),
    "webm-opus": ("webm", "libopus", 48_000),
}


async def speak(client: httpx.AsyncClient, text: str, **options: object) -> bytes:
    """The server's speech for `text` as WAV bytes."""
    response = await client.post("/api/audio/speech", json={"input": text, **options})
    assert response.status_code == 200, response.text
    return response.content


def encode(wav: bytes, container: str) -> bytes:
    """A WAV recording re-encoded into one of CONTAINERS."""
    muxer, codec, rate = CONTAINERS[container]
    out = io.BytesIO()
    with av.open(io.BytesIO(wav)) as source, av.open(out, mode="w", format=muxer) as target:
        stream = target.add_stream(codec, rate=rate or source.streams.audio[0].rate, layout="mono")
        for frame in source.decode(audio=0):
            frame.pts = None  # let the encoder count time at its own rate
            for packet in stream.encode(frame):
                target.mux(packet)
        for packet in stream.encode(None):
            target.mux(packet)
    return out.getvalue()


def silence_wav(seconds: float, rate: int = 16_000) -> bytes:
    """Digital silence as a WAV file."""
    return wav_bytes(np.zeros(int(seconds * rate), dtype=np.int16), rate)


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    pcm = samples.astype("<i2").tobytes()
    fmt = struct.pack("<4sIHHIIHH", b"fmt ", 16, 1, 1, rate, rate * 2, 2, 16)
    return b"RIFF" + struct.pack("<I", 36 + len(pcm)) + b"WAVE" + fmt + b"data" + struct.pack("<I", len(pcm)) + pcm


def duration(audio: bytes) -> float:
    """Seconds of audio in any container PyAV reads."""
    with av.open(io.BytesIO(audio)) as container:
        samples = sum(frame.samples for frame in container.decode(audio=0))
        return float(samples / container.streams.audio[0].rate)


def words(text: str) -> list[str]:
    """Text normalised for comparing transcripts: lower case, no punctuation (apostrophes kept)."""
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower().replace("-", " ")).split()


def word_errors(reference: str, hypothesis: str) -> int:
    """Word-level edit distance (substitutions, insertions, deletions) between normalised texts."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, 1):
        previous, row[0] = row[0], i
        for j, hyp_word in enumerate(hyp, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (ref_word != hyp_word))
    return row[-1]


def word_error_rate(reference: str, hypothesis: str) -> float:
    return word_errors(reference, hypothesis) / max(1, len(words(reference)))
