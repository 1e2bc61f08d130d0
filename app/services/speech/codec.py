"""Audio in and out: any common container decoded in-process with PyAV, and WAV written by hand.

PyAV's wheel bundles FFmpeg's libraries, so WAV, MP3, FLAC, OGG/Opus and WebM/Opus (what browsers' MediaRecorder
produces) decode without an ffmpeg binary on the system. Whisper wants 16 kHz mono float32 samples.
"""

from __future__ import annotations

import io
import struct

import av
import numpy as np
import numpy.typing as npt
from av.error import FFmpegError

from app.domain.errors import InvalidInputError, TooLargeError

WHISPER_SAMPLE_RATE = 16_000
Samples = npt.NDArray[np.float32]


def decode_audio(data: bytes, *, max_seconds: float, field: str, format_hint: str | None = None) -> Samples:
    """The first audio stream of `data` as 16 kHz mono float32; undecodable or empty audio is a 400.

    The container is recognised from its content; `format_hint` (an FFmpeg format name such as "s16le") is only
    tried when that fails, for raw formats that carry no header.
    """
    if not data:
        raise InvalidInputError(f"{field} is empty", field=field)
    undecodable = InvalidInputError(
        f"{field} is not audio in a format that can be decoded (WAV, MP3, FLAC, OGG/Opus, WebM/Opus, ...)",
        field=field,
    )
    try:
        try:
            samples = _decode(data, max_seconds, field, None)
        except FFmpegError:
            if not format_hint:
                raise undecodable from None
            try:
                samples = _decode(data, max_seconds, field, format_hint)
            except (FFmpegError, ValueError):  # ValueError: a format name FFmpeg does not know
                raise undecodable from None
    except _TooLong:
        raise TooLargeError(f"{field} is longer than {max_seconds:g} s, the limit", field=field) from None
    if samples.size == 0:
        raise InvalidInputError(f"{field} contains no audio samples", field=field)
    return samples


class _TooLong(Exception):
    pass


def _decode(data: bytes, max_seconds: float, field: str, format_name: str | None) -> Samples:
    max_samples = int(max_seconds * WHISPER_SAMPLE_RATE)
    with av.open(io.BytesIO(data), mode="r", format=format_name) as container:
        if not container.streams.audio:
            raise InvalidInputError(f"{field} has no audio stream", field=field)
        resampler = av.AudioResampler(format="flt", layout="mono", rate=WHISPER_SAMPLE_RATE)
        chunks: list[Samples] = []
        total = 0
        for frame in container.decode(container.streams.audio[0]):
            assert isinstance(frame, av.AudioFrame)  # an audio stream decodes to audio frames
            for resampled in resampler.resample(frame):
                chunk = resampled.to_ndarray()[0]
                total += chunk.size
                if total > max_samples:
                    raise _TooLong
                chunks.append(chunk)
        chunks.extend(resampled.to_ndarray()[0] for resampled in resampler.resample(None))
    return np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)


def pcm16(samples: npt.NDArray[np.float32]) -> bytes:
    """Float samples in [-1, 1] as 16-bit little-endian PCM."""
    return (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes()


# For a WAV streamed before its length is known, the RIFF and data sizes are set to the largest value, which
# players and decoders (FFmpeg, Python's wave, browsers) read as "until the end of the stream".
STREAMING_SIZE = 0xFFFFFFFF


def wav_header(sample_rate: int, data_bytes: int = STREAMING_SIZE) -> bytes:
    """A 44-byte header for 16-bit mono PCM; without `data_bytes`, one for a stream of unknown length."""
    riff_size = STREAMING_SIZE if data_bytes == STREAMING_SIZE else 36 + data_bytes
    return (
        b"RIFF"
        + struct.pack("<I", riff_size)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
        + b"data"
        + struct.pack("<I", data_bytes)
    )


def wav_file(pcm: bytes, sample_rate: int) -> bytes:
    """A complete WAV file of 16-bit mono PCM."""
    return wav_header(sample_rate, len(pcm)) + pcm
