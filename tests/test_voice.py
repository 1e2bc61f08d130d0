"""Voice chat: a recorded message is transcribed, stored as the user's message and replied to, over HTTP and the
WebSocket, where the reply's sentences are spoken while its text still streams."""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import httpx

from tests.audio_samples import duration, encode, silence_wav, speak, word_error_rate, words
from tests.helpers import connect_socket, frames_until_done, get_conversation, new_conversation, next_frame
from tests.server import TEST_MAX_AUDIO_BYTES

QUESTION = "What is the capital of France?"
SKY_QUESTION = "Why is the sky blue?"  # the default model answers it in several sentences
LONG_REQUEST = "Please tell me a long story about a dragon who learns to bake bread."


async def send_voice(
    client: httpx.AsyncClient, session_id: str, audio: bytes, name: str = "speech.wav", **params: str
) -> httpx.Response:
    return await client.post(
        f"/api/conversations/{session_id}/voice", files={"file": (name, audio)}, data={}, params=params
    )


async def test_a_recorded_message_is_transcribed_stored_and_answered(client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(client))["session_id"]
    recording = encode(await speak(client, QUESTION), "webm-opus")  # what a browser's MediaRecorder sends
    response = await send_voice(client, session_id, recording, "recording.webm")
    assert response.status_code == 200, response.text
    body = response.json()
    transcript = body["transcript"]
    assert word_error_rate(QUESTION, transcript["text"]) <= 0.15 and transcript["language"] == "en"
    assert body["user_message"]["content"] == transcript["text"] and body["user_message"]["role"] == "user"
    reply = body["response"]
    assert "paris" in reply.lower() and body["assistant_message"]["content"] == reply
    assert body["reply_audio"] is None
    stored = (await get_conversation(client, session_id))["messages"]
    assert [(m["role"], m["content"]) for m in stored] == [("user", transcript["text"]), ("assistant", reply)]


async def test_the_reply_can_come_spoken_as_base64_wav(client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(client))["session_id"]
    response = await send_voice(client, session_id, await speak(client, QUESTION), reply_audio="true")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["reply_audio_format"] == "wav"
    wav = base64.b64decode(body["reply_audio"])
    assert wav.startswith(b"RIFF") and duration(wav) > 1
    heard = await client.post("/api/audio/transcriptions", files={"file": ("reply.wav", wav)})
    assert "paris" in body["response"].lower() and "paris" in heard.json()["text"].lower()  # the reply, spoken


async def test_bad_recordings_are_400_and_store_nothing(client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(client))["session_id"]
    for audio in [b"", os.urandom(2048), silence_wav(1.5)]:
        response = await send_voice(client, session_id, audio)
        assert response.status_code == 400, response.text
        assert response.json()["field"] == "file"
    silent = await send_voice(client, session_id, silence_wav(1.5))
    assert "no speech" in silent.json()["detail"]
    unknown_voice = await send_voice(client, session_id, await speak(client, QUESTION), reply_audio="true", voice="x")
    assert unknown_voice.status_code == 404 and unknown_voice.json()["field"] == "voice"
    assert (await get_conversation(client, session_id))["messages"] == []


async def test_voice_to_an_unknown_or_malformed_conversation(client: httpx.AsyncClient) -> None:
    recording = await speak(client, QUESTION)
    missing = await send_voice(client, "00000000-0000-4000-8000-000000000000", recording)
    assert missing.status_code == 404, missing.text
    malformed = await send_voice(client, "not-a-uuid", recording)
    assert malformed.status_code == 400 and malformed.json()["field"] == "session_id"


def audio_frame(recording: bytes, **fields: Any) -> str:
    return json.dumps({"type": "audio", "data": base64.b64encode(recording).decode(), **fields})


async def frames_until_spoken(socket: Any) -> list[dict[str, Any]]:
    """Frames up to and including `audio_done` (it comes after `done`: the last sentence ends with the reply)."""
    frames = []
    while True:
        frames.append(await next_frame(socket))
        if frames[-1]["type"] in ("audio_done", "error"):
            return frames


async def test_a_spoken_message_over_the_socket_streams_text_and_speech_together(client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(client))["session_id"]
    recording = encode(await speak(client, SKY_QUESTION), "ogg-opus")
    async with connect_socket(client, session_id) as socket:
        await socket.send(audio_frame(recording, format="ogg"))
        transcript = await next_frame(socket)
        user = await next_frame(socket)
        frames = await frames_until_spoken(socket)
    assert transcript["type"] == "transcript" and word_error_rate(SKY_QUESTION, transcript["text"]) <= 0.15
    assert transcript["language"] == "en" and transcript["duration"] > 1
    assert user["type"] == "user_message" and user["message"]["content"] == transcript["text"]
    kinds = [f["type"] for f in frames]
    done = frames[kinds.index("done")]
    tokens = [f for f in frames if f["type"] == "token"]
    audio = [f for f in frames if f["type"] == "audio"]
    assert done["message"]["content"] == "".join(t["text"] for t in tokens)
    assert [a["index"] for a in audio] == list(range(len(audio)))
    assert frames[-1] == {"type": "audio_done", "count": len(audio)}
    # Speech overlaps the text: the first sentence is spoken while the reply is still streaming.
    assert kinds.index("audio") < kinds.index("done"), kinds
    # Every piece is a WAV file of its text, and the pieces together are the whole reply.
    assert words(" ".join(a["text"] for a in audio)) == words(done["message"]["content"])
    first = base64.b64decode(audio[0]["data"])
    assert audio[0]["format"] == "wav" and first.startswith(b"RIFF") and duration(first) > 0.3
    stored = (await get_conversation(client, session_id))["messages"]
    assert [m["content"] for m in stored] == [transcript["text"], done["message"]["content"]]


async def test_a_spoken_message_can_be_answered_in_text_only(client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(client))["session_id"]
    async with connect_socket(client, session_id) as socket:
        await socket.send(audio_frame(await speak(client, QUESTION), reply_audio=False))
        assert (await next_frame(socket))["type"] == "transcript"
        assert (await next_frame(socket))["type"] == "user_message"
        frames = await frames_until_done(socket)
        await socket.send(json.dumps({"type": "message", "content": "Thanks!", "max_tokens": 4}))
        assert (await next_frame(socket))["type"] == "user_message"  # no audio frame came in between
    assert {f["type"] for f in frames} <= {"token", "done"}


async def test_stopping_a_spoken_reply_stops_its_speech(client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(client))["session_id"]
    async with connect_socket(client, session_id) as socket:
        await socket.send(audio_frame(await speak(client, LONG_REQUEST)))
        assert (await next_frame(socket))["type"] == "transcript"
        assert (await next_frame(socket))["type"] == "user_message"
        assert (await next_frame(socket))["type"] == "token"
        await socket.send(json.dumps({"type": "stop"}))
        frames = await frames_until_spoken(socket)
    done = next(f for f in frames if f["type"] == "done")
    assert done["finish_reason"] == "cancelled"
    assert frames[-1]["type"] == "audio_done"  # speech ends too, without the unfinished sentence


async def test_bad_audio_frames_get_errors_and_the_socket_stays_usable(client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(client))["session_id"]
    recording = await speak(client, QUESTION)
    async with connect_socket(client, session_id) as socket:
        await socket.send(json.dumps({"type": "audio", "data": "not base64!"}))
        assert (await next_frame(socket))["code"] == "invalid_frame"
        for frame, code in [
            (audio_frame(b"not audio at all" * 64), "invalid_input"),
            (audio_frame(b""), "invalid_input"),
            (audio_frame(os.urandom(TEST_MAX_AUDIO_BYTES + 1)), "too_large"),
            (audio_frame(silence_wav(1.0)), "invalid_input"),
            (audio_frame(recording, voice="nobody"), "not_found"),
            (audio_frame(recording, language="xx"), "invalid_input"),
        ]:
            await socket.send(frame)
            error = await next_frame(socket)
            assert error["type"] == "error" and error["code"] == code, error
        await socket.send(audio_frame(recording, reply_audio=False, max_tokens=4))
        assert (await next_frame(socket))["type"] == "transcript"
        assert (await next_frame(socket))["type"] == "user_message"
        assert (await frames_until_done(socket))[-1]["type"] == "done"
    assert len((await get_conversation(client, session_id))["messages"]) == 2  # only the good one was stored
