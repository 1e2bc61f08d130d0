"""The OpenAI-compatible /v1 API, through the official `openai` client against a running server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import openai
import pytest

from tests.helpers import get_conversation, new_conversation
from tests.server import ChipiServer


@pytest.fixture
async def oai(server: ChipiServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture
async def model_id(oai: openai.AsyncOpenAI) -> str:
    models = await oai.models.list()
    assert len(models.data) == 1 and models.data[0].object == "model"
    return models.data[0].id


async def test_a_completion(oai: openai.AsyncOpenAI, model_id: str) -> None:
    completion = await oai.chat.completions.create(
        model=model_id,
        messages=[
            {"role": "system", "content": "You answer in one short sentence."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        temperature=0,
    )
    assert completion.object == "chat.completion" and completion.model == model_id
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and "paris" in (choice.message.content or "").lower()
    assert choice.finish_reason == "stop"
    assert (
        completion.usage is not None and completion.usage.prompt_tokens > 0 and completion.usage.completion_tokens > 0
    )
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


async def test_the_model_sees_the_request_history(oai: openai.AsyncOpenAI, model_id: str) -> None:
    completion = await oai.chat.completions.create(
        model=model_id,
        messages=[
            {"role": "user", "content": "The secret password is tangerine."},
            {"role": "assistant", "content": "Understood, I will remember it."},
            {"role": "user", "content": "What is the secret password?"},
        ],
        temperature=0,
    )
    assert "tangerine" in (completion.choices[0].message.content or "").lower()


async def test_streaming_with_a_final_usage_chunk(oai: openai.AsyncOpenAI, model_id: str) -> None:
    stream = await oai.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": "Name three colors."}],
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish_reasons, usage = "", [], None
    async for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish_reasons.append(choice.finish_reason)
    assert text.strip() and finish_reasons[-1] in {"stop", "length"}
    assert all(reason is None for reason in finish_reasons[:-1])
    assert usage is not None and usage.completion_tokens > 1


async def test_max_completion_tokens_and_max_tokens(oai: openai.AsyncOpenAI, model_id: str) -> None:
    for limit in ({"max_completion_tokens": 5}, {"max_tokens": 5}):
        completion = await oai.chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": "Count from one to fifty."}], temperature=0, **limit
        )
        assert completion.choices[0].finish_reason == "length"
        assert completion.usage is not None and completion.usage.completion_tokens == 5


async def test_a_stop_sequence_ends_the_reply_before_it(oai: openai.AsyncOpenAI, model_id: str) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    full = await oai.chat.completions.create(model=model_id, messages=messages, temperature=0)  # type: ignore[arg-type]
    full_text = full.choices[0].message.content or ""
    assert "Paris" in full_text
    cut = await oai.chat.completions.create(model=model_id, messages=messages, temperature=0, stop=["Paris"])  # type: ignore[arg-type]
    assert cut.choices[0].message.content == full_text[: full_text.index("Paris")]
    assert cut.choices[0].finish_reason == "stop"
    stream = await oai.chat.completions.create(
        model=model_id,
        messages=messages,  # type: ignore[arg-type]
        temperature=0,
        stop="Paris",
        stream=True,
    )
    streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert streamed == full_text[: full_text.index("Paris")]


async def test_a_seed_makes_sampling_repeatable(oai: openai.AsyncOpenAI, model_id: str) -> None:
    async def sample(seed: int) -> str:
        completion = await oai.chat.completions.create(
            model=model_id,
            messages=[{"role": "user", "content": "Write a short poem about the sea."}],
            temperature=1.0,
            top_p=1.0,
            seed=seed,
            max_tokens=24,
        )
        return completion.choices[0].message.content or ""

    first, again, other = await sample(7), await sample(7), await sample(8)
    assert first == again
    assert first != other


async def test_the_extension_field_stores_the_exchange(
    oai: openai.AsyncOpenAI, model_id: str, client: httpx.AsyncClient
) -> None:
    session_id = (await new_conversation(client))["session_id"]
    completion = await oai.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": "Say hello to Chipi."}],
        temperature=0,
        max_tokens=12,
        extra_body={"chipi_session_id": session_id},
    )
    stored = await get_conversation(client, session_id)
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant"]
    assert stored["messages"][0]["content"] == "Say hello to Chipi."
    assert stored["messages"][1]["content"] == completion.choices[0].message.content
    assert stored["conversation"]["title"] == "Say hello to Chipi."


async def test_errors_have_the_openai_shape(oai: openai.AsyncOpenAI, model_id: str, client: httpx.AsyncClient) -> None:
    with pytest.raises(openai.NotFoundError) as unknown_model:
        await oai.chat.completions.create(model="gpt-nothing", messages=[{"role": "user", "content": "hi"}])
    assert unknown_model.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as not_user:
        await oai.chat.completions.create(model=model_id, messages=[{"role": "assistant", "content": "hi"}])
    assert not_user.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        await oai.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}], n=2)
    with pytest.raises(openai.BadRequestError):
        await oai.chat.completions.create(model=model_id, messages=[])
    with pytest.raises(openai.NotFoundError):
        await oai.chat.completions.create(
            model=model_id,
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"chipi_session_id": "00000000-0000-0000-0000-000000000000"},
        )
    raw = await client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert raw.status_code == 400
    assert set(raw.json()["error"]) == {"message", "type", "param", "code"}
