"""Speech speed through the API: whisper's real-time factor, Piper's time to first audio and real-time factor.

    python -m bench.speech [--runs 5]

Prints one table, measured against a real server (uvicorn subprocess, SQLite) with the configured models (by
default whisper tiny.en and the Piper voice en_US-joe-medium). A real-time factor is processing time divided by
the audio's length: below 1 is faster than real time. Each figure is the median of `--runs` requests after one
warm-up request.

- STT: Piper speech cut to exactly 5 s and 30 s, sent as WAV to POST /api/audio/transcriptions; the time is the
  whole request (upload, decoding, resampling, transcription).
- TTS: POST /api/audio/speech of a three-sentence reply; time to the first audio byte (the first PCM byte after
  the WAV header), and the whole stream's time over the speech's length.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
import wave

import httpx

from app.assets import ensure_default_assets
from app.settings import Settings
from bench.report import print_table
from tests.server import ChipiServer

STORY = (
    "The old lighthouse stood at the edge of the cliff, watching over the harbour. Every evening the keeper climbed "
    "the narrow stairs, lit the great lamp, and looked out across the dark water. Ships passed in the night, their "
    "crews grateful for the steady light. One winter a storm came in from the north, and the waves rose higher than "
    "anyone could remember. The keeper stayed awake until morning, keeping the lamp burning through the wind and "
    "the rain. When the sun finally rose, the fishing boats came home safely, one after another, and the whole "
    "village gathered on the shore to thank him. He only smiled and said that the light had done the work."
)
REPLY = (
    "Sure, here is a quick summary. The meeting moved to Thursday afternoon at the main office. "
    "Please bring the latest figures and your notes from last week."
)
WAV_HEADER_BYTES = 44


def wav_cut(wav: bytes, seconds: float) -> bytes:
    """The first `seconds` of a WAV file (repeated if it is shorter), as a complete WAV file."""
    with wave.open(io.BytesIO(wav)) as source:
        rate, frames = source.getframerate(), source.readframes(source.getnframes())
    wanted = int(seconds * rate) * 2
    pcm = (frames * (wanted // len(frames) + 1))[:wanted]
    out = io.BytesIO()
    with wave.open(out, "wb") as target:
        target.setnchannels(1)
        target.setsampwidth(2)
        target.setframerate(rate)
        target.writeframes(pcm)
    return out.getvalue()


def transcribe_seconds(client: httpx.Client, wav: bytes) -> float:
    started = time.perf_counter()
    response = client.post("/api/audio/transcriptions", files={"file": ("speech.wav", wav)})
    response.raise_for_status()
    return time.perf_counter() - started


def speak_timed(client: httpx.Client, text: str) -> tuple[float, float, float]:
    """Time to the first audio byte, time to the end of the stream, and the speech's length, in seconds."""
    started = time.perf_counter()
    first_audio: float | None = None
    received = 0
    rate = 0
    with client.stream("POST", "/api/audio/speech", json={"input": text}) as response:
        response.raise_for_status()
        rate = int(response.headers["x-sample-rate"])
        for chunk in response.iter_raw():
            received += len(chunk)
            if first_audio is None and received > WAV_HEADER_BYTES:
                first_audio = time.perf_counter() - started
    total = time.perf_counter() - started
    assert first_audio is not None
    return first_audio, total, (received - WAV_HEADER_BYTES) / 2 / rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    settings = Settings.from_env()
    ensure_default_assets(settings)

    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp, ChipiServer(f"sqlite+aiosqlite:///{tmp}/bench.db") as server:
        client = httpx.Client(base_url=server.url, timeout=300)
        story = client.post("/api/audio/speech", json={"input": STORY}).content
        for seconds in (5, 30):
            clip = wav_cut(story, seconds)
            transcribe_seconds(client, clip)  # warm-up
            times = [transcribe_seconds(client, clip) for _ in range(args.runs)]
            rows.append((f"STT real-time factor, {seconds} s of speech", f"{statistics.median(times) / seconds:.3f}"))
        speak_timed(client, REPLY)  # warm-up
        runs = [speak_timed(client, REPLY) for _ in range(args.runs)]
        first = statistics.median(run[0] for run in runs)
        rtf = statistics.median(run[1] / run[2] for run in runs)
        speech_seconds = statistics.median(run[2] for run in runs)
        rows += [
            (f"TTS time to first audio byte (HTTP, {speech_seconds:.1f} s reply)", f"{first * 1000:.0f} ms"),
            ("TTS real-time factor (whole stream)", f"{rtf:.3f}"),
        ]
    print_table(
        f"Chipi speech speed (whisper {settings.whisper_model}, voice {settings.voice}, median of {args.runs})", rows
    )


if __name__ == "__main__":
    main()
