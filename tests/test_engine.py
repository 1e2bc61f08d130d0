"""The batched decode engine behind ModelService.stream, with the real default model on the CPU.

Replies generated at the same time share forward passes; each must still read as if it had been generated alone.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch
from torch.nn import functional
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicCache

from app.domain.generation import ChatTurn, GenerationFinished, GenerationParams, Prompt, TextDelta
from app.services import engine as engine_module
from app.services import kernels
from app.services.cpu_layers import BlockLinear, PackedLinear, onednn_packs_linears
from app.services.engine import PREFILL_CHUNK_TOKENS, DecodeEngine
from app.services.kv_cache import spare_room_cache
from app.services.llama_forward import LlamaForward
from app.services.model import ModelService
from app.services.tokenizer import next_turn_opening
from app.settings import Settings
from tests.model_helpers import last_logits

pytestmark = pytest.mark.model

GREEDY = GenerationParams(max_new_tokens=48, temperature=0.0, top_p=1.0)
QUESTIONS = [
    "Write a story about a dragon who learns to bake bread.",
    "Explain how rainbows form.",
    "List five fruits.",
    "What is the capital of France? Answer in two sentences, then tell me about its history.",
]
# Float32 batching is not bit-exact: a row next to others (and behind left padding) goes through matrix products
# of another shape, whose sums round differently in the last bits. Greedy picks the same tokens as long as no two
# candidates are that close, which holds for the first few dozen tokens of these prompts; a near-tie later may
# send a batched reply down another path than the same reply alone, so equality is asserted on this prefix only.
EXACT_PREFIX_TOKENS = 32


@dataclass
class Reply:
    deltas: list[str]
    finished: GenerationFinished

    @property
    def text(self) -> str:
        return "".join(self.deltas)


@pytest.fixture(scope="module")
def service() -> Iterator[ModelService]:
    model = ModelService.load(Settings.from_env())
    yield model
    model.close()


@pytest.fixture
def batch_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of rows of every decode step the engine runs during the test."""
    sizes: list[int] = []
    step = DecodeEngine._step

    def counting_step(engine: DecodeEngine) -> None:
        sizes.append(len(engine._batch))
        step(engine)

    monkeypatch.setattr(DecodeEngine, "_step", counting_step)
    return sizes


def prompt(service: ModelService, question: str, system: str | None = None) -> Prompt:
    return service.build_prompt(system, [ChatTurn("user", question)], 64)


@functools.cache
def plain_model(name: str) -> Any:
    """Plain transformers on the same checkpoint, in float32: the reference every reply is held to."""
    return AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).eval()


def generate_ids(service: ModelService, prompt: Prompt, max_new_tokens: int) -> list[int]:
    """The reply plain `model.generate` gives, greedy: the reference."""
    input_ids = torch.tensor([prompt.token_ids])
    with torch.inference_mode():
        output = plain_model(service.name).generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=service.tokenizer.pad_token_id,
        )
    return list(output[0, input_ids.shape[1] :].tolist())


def decode(service: ModelService, ids: list[int]) -> str:
    return service.tokenizer.decode(ids).rstrip("\ufffd")


def record_prompt_passes(monkeypatch: pytest.MonkeyPatch, after_each: Callable[[], None] = lambda: None) -> list[int]:
    """The tokens each pass of prompt reading feeds from now on, `after_each` called after each pass. (A forward
    hook would also count the passes that read a finished reply's next turn ahead when the engine is quiet.)"""
    fed: list[int] = []
    read_pass = DecodeEngine._read_pass

    def recording_pass(engine: DecodeEngine, prefill: Any) -> Any:
        fed.append(min(PREFILL_CHUNK_TOKENS, len(prefill.request.prompt_ids) - prefill.read))
        logits = read_pass(engine, prefill)
        after_each()
        return logits

    monkeypatch.setattr(DecodeEngine, "_read_pass", recording_pass)
    return fed


async def reply(
    service: ModelService,
    prompt: Prompt,
    params: GenerationParams = GREEDY,
    cancelled: threading.Event | None = None,
    progress: asyncio.Queue[int] | None = None,
) -> Reply:
    """Stream one reply; `progress` hears the number of deltas so far after each one."""
    deltas: list[str] = []
    async for output in service.stream(prompt, params, cancelled or threading.Event()):
        if isinstance(output, TextDelta):
            deltas.append(output.text)
            if progress is not None:
                progress.put_nowait(len(deltas))
        else:
            return Reply(deltas, output)
    raise AssertionError("the stream ended without GenerationFinished")


async def test_a_lone_greedy_reply_is_plain_generate_token_for_token(service: ModelService) -> None:
    the_prompt = prompt(service, QUESTIONS[0])
    expected = generate_ids(service, the_prompt, 64)
    got: list[int] = []
    finished = asyncio.get_running_loop().create_future()
    loop = asyncio.get_running_loop()

    def sink(event: object) -> None:
        if isinstance(event, int):
            got.append(event)
        else:
            loop.call_soon_threadsafe(finished.set_result, event)

    service._engine.submit(
        the_prompt.token_ids,
        max_new_tokens=64,
        temperature=0.0,
        top_p=1.0,
        seed=None,
        cancelled=threading.Event(),
        sink=sink,
    )
    await finished
    assert got == expected

    # Again without the prefix cache, so the prompt is read exactly as the first time: under CHIPI_DTYPE=float16 on
    # the CPU, a prompt read partly from the cache rounds differently and may part from the first reply after dozens
    # of tokens.
    uncached = ModelService(service.model, service.tokenizer, name=service.name, context_window=service.context_window)
    try:
        streamed = await reply(uncached, the_prompt, GenerationParams(64, 0.0, 1.0))
    finally:
        uncached.close()
    assert streamed.text == decode(service, expected)  # the deltas concatenate to the decoded reply
    assert all(streamed.deltas) and "\ufffd" not in streamed.text
    assert streamed.finished == GenerationFinished("length", len(the_prompt.token_ids), 64)


async def test_a_prompt_read_in_several_passes_answers_as_plain_generate(service: ModelService) -> None:
    """A prompt longer than PREFILL_CHUNK_TOKENS is read a pass at a time, each attending to the passes before it."""
    system = " ".join(["You are a careful assistant who answers questions about the weather and the sky."] * 12)
    the_prompt = prompt(service, QUESTIONS[1], system=system)
    assert len(the_prompt.token_ids) > 3 * PREFILL_CHUNK_TOKENS
    uncached = ModelService(service.model, service.tokenizer, name=service.name, context_window=service.context_window)
    try:
        got = await reply(uncached, the_prompt, GenerationParams(EXACT_PREFIX_TOKENS, 0.0, 1.0))
    finally:
        uncached.close()
    assert got.text == decode(service, generate_ids(service, the_prompt, EXACT_PREFIX_TOKENS))


async def test_a_long_prompt_is_read_between_the_steps_of_running_replies(
    service: ModelService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A running reply keeps getting tokens while another request's long prompt is read (a slice of passes at a time),
    and the long prompt still answers as plain generate."""
    order: list[str] = []
    read_pass, step = DecodeEngine._read_pass, DecodeEngine._step

    def recording_pass(engine: DecodeEngine, prefill: Any) -> Any:
        order.append("pass")
        return read_pass(engine, prefill)

    def recording_step(engine: DecodeEngine) -> None:
        order.append("step")
        step(engine)

    monkeypatch.setattr(DecodeEngine, "_read_pass", recording_pass)
    monkeypatch.setattr(DecodeEngine, "_step", recording_step)
    system = " ".join(["You are a careful assistant who answers questions about the weather and the sky."] * 60)
    long_prompt = prompt(service, QUESTIONS[1], system=system)
    assert len(long_prompt.token_ids) > 10 * PREFILL_CHUNK_TOKENS
    uncached = ModelService(service.model, service.tokenizer, name=service.name, context_window=service.context_window)
    try:
        progress: asyncio.Queue[int] = asyncio.Queue()
        running = asyncio.create_task(
            reply(uncached, prompt(uncached, QUESTIONS[0]), GenerationParams(128, 0.0, 1.0), progress=progress)
        )
        while await progress.get() < 3:  # under way
            pass
        order.clear()
        long = await reply(uncached, long_prompt, GenerationParams(EXACT_PREFIX_TOKENS, 0.0, 1.0))
        await running
    finally:
        uncached.close()
    passes = [index for index, what in enumerate(order) if what == "pass"]
    assert len(passes) > 10
    assert "step" in order[passes[0] : passes[-1]]  # the running reply stepped while the long prompt was read
    assert long.text == decode(service, generate_ids(service, long_prompt, EXACT_PREFIX_TOKENS))


async def test_a_request_arriving_while_a_long_prompt_is_read_takes_turns_with_it(
    service: ModelService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prompts are read a pass each in turn, so a short one that arrives during a long one's prefill starts first."""
    passes: list[tuple[int, int]] = []  # (the prompt's length, where the pass ends), in the order they ran
    read_pass, loop, first_pass = DecodeEngine._read_pass, asyncio.get_running_loop(), asyncio.Event()

    def recording_pass(engine: DecodeEngine, prefill: Any) -> Any:
        logits = read_pass(engine, prefill)
        passes.append((len(prefill.request.prompt_ids), prefill.read))
        loop.call_soon_threadsafe(first_pass.set)
        return logits

    monkeypatch.setattr(DecodeEngine, "_read_pass", recording_pass)
    system = " ".join(["You are a careful assistant who answers questions about the weather and the sky."] * 60)
    long_prompt, short_prompt = prompt(service, QUESTIONS[1], system=system), prompt(service, QUESTIONS[2])
    uncached = ModelService(service.model, service.tokenizer, name=service.name, context_window=service.context_window)
    try:
        long = asyncio.create_task(reply(uncached, long_prompt, GenerationParams(4, 0.0, 1.0)))
        await first_pass.wait()  # the long prompt is being read
        short = await reply(uncached, short_prompt, GenerationParams(4, 0.0, 1.0))
        await long
    finally:
        uncached.close()
    assert short.finished.completion_tokens == 4
    short_done = passes.index((len(short_prompt.token_ids), len(short_prompt.token_ids)))
    long_done = passes.index((len(long_prompt.token_ids), len(long_prompt.token_ids)))
    assert short_done < long_done


def test_a_reply_whose_event_loop_closed_is_cancelled(service: ModelService, monkeypatch: pytest.MonkeyPatch) -> None:
    """A consumer that is gone without closing its stream (its event loop closed) stops the engine's work for it."""
    reasons: list[str] = []
    finish = DecodeEngine._finish

    def recording_finish(engine: DecodeEngine, request: Any, reason: str) -> None:
        reasons.append(reason)
        finish(engine, request, reason)

    monkeypatch.setattr(DecodeEngine, "_finish", recording_finish)

    async def first_delta() -> Any:
        stream = service.stream(prompt(service, QUESTIONS[0]), GenerationParams(4000, 0.0, 1.0), threading.Event())
        await anext(stream)
        return stream  # left open

    loop = asyncio.new_event_loop()
    stream = loop.run_until_complete(first_delta())
    loop.close()
    deadline = time.monotonic() + 30
    while not reasons and time.monotonic() < deadline:
        time.sleep(0.01)
    assert reasons == ["cancelled"]
    del stream


async def test_a_paced_reply_comes_in_fewer_deltas_and_its_end_cuts_a_pause_short(service: ModelService) -> None:
    """With a delta interval (ChatService asks for CHIPI_STREAM_EVENT_INTERVAL_SECONDS), the tokens of each interval
    come as one delta, the same text in all; the reply's end does not wait for the pause, so even an interval far
    longer than the reply costs it nothing."""
    the_prompt = prompt(service, QUESTIONS[1])
    # without the prefix cache, so that both read the prompt alike (see the test above)
    uncached = ModelService(service.model, service.tokenizer, name=service.name, context_window=service.context_window)
    try:
        every_token = await reply(uncached, the_prompt)
        started = time.monotonic()
        paced = await reply(uncached, the_prompt, replace(GREEDY, delta_interval_seconds=60.0))
        elapsed = time.monotonic() - started
    finally:
        uncached.close()
    assert elapsed < 30
    assert paced.text == every_token.text and paced.finished == every_token.finished
    assert len(every_token.deltas) > 10 and 1 <= len(paced.deltas) <= 2  # the first token's, then the rest at the end


async def test_concurrent_greedy_replies_match_their_solo_runs(service: ModelService, batch_sizes: list[int]) -> None:
    prompts = [prompt(service, question) for question in QUESTIONS]
    prompts[1] = prompt(service, QUESTIONS[1], system="You are a patient physics teacher.")  # a longer prompt
    solo = [generate_ids(service, p, GREEDY.max_new_tokens) for p in prompts]

    replies = await asyncio.gather(*(reply(service, p) for p in prompts))

    assert max(batch_sizes) == len(prompts)  # they did share forward passes
    for got, expected, p in zip(replies, solo, prompts, strict=True):
        assert got.text.startswith(decode(service, expected[:EXACT_PREFIX_TOKENS]))
        assert got.finished.prompt_tokens == len(p.token_ids)
        assert got.finished.completion_tokens == GREEDY.max_new_tokens or got.finished.finish_reason == "stop"


async def test_a_request_joins_a_running_batch(service: ModelService, batch_sizes: list[int]) -> None:
    first, second = prompt(service, QUESTIONS[0]), prompt(service, QUESTIONS[1])
    progress: asyncio.Queue[int] = asyncio.Queue()
    running = asyncio.create_task(reply(service, first, GenerationParams(64, 0.0, 1.0), progress=progress))
    while await progress.get() < 10:  # the first reply is well under way
        pass

    joined = await reply(service, second, GenerationParams(24, 0.0, 1.0))
    assert not running.done()  # it joined while the first one was still generating, and finished first
    earlier = await running

    assert 1 in batch_sizes and 2 in batch_sizes
    assert earlier.text.startswith(decode(service, generate_ids(service, first, EXACT_PREFIX_TOKENS)))
    assert joined.text == decode(service, generate_ids(service, second, 24))
    assert joined.finished.finish_reason == "length" and joined.finished.completion_tokens == 24


async def test_a_row_ending_mid_batch_and_a_longer_prompt_joining_leave_every_reply_intact(
    service: ModelService, batch_sizes: list[int]
) -> None:
    """The middle row ends first and the last row takes its place; then a prompt longer than the batch's columns
    joins, which moves every row behind more padding: each reply is still its solo run."""
    first, middle, last = (prompt(service, question) for question in QUESTIONS[:3])
    joining = prompt(service, QUESTIONS[3], system="You are a patient historian who answers carefully. " * 8)
    long = GenerationParams(64, 0.0, 1.0)
    running = asyncio.create_task(reply(service, first, long))
    ending = asyncio.create_task(reply(service, middle, GenerationParams(6, 0.0, 1.0)))
    running = [running, asyncio.create_task(reply(service, last, long))]
    ended = await ending
    assert not any(task.done() for task in running)
    joined = await reply(service, joining, GenerationParams(24, 0.0, 1.0))
    assert not all(task.done() for task in running)  # it joined rows still running
    earlier, later = await asyncio.gather(*running)

    assert 3 in batch_sizes and len(joining.token_ids) > len(first.token_ids) + 6
    assert ended.text == decode(service, generate_ids(service, middle, 6))
    assert joined.text.startswith(decode(service, generate_ids(service, joining, 24)[:16]))
    for got, p in ((earlier, first), (later, last)):
        assert got.text.startswith(decode(service, generate_ids(service, p, EXACT_PREFIX_TOKENS)))


async def test_a_prompt_cached_but_for_its_last_token_joins_the_running_batch_without_a_pass_of_its_own(
    service: ModelService, monkeypatch: pytest.MonkeyPatch
) -> None:
    running_prompt, repeated_prompt = prompt(service, QUESTIONS[0]), prompt(service, QUESTIONS[2])
    await reply(service, repeated_prompt, GenerationParams(4, 0.0, 1.0))  # the prompt is now in the prefix cache
    passes: list[int] = []  # tokens fed by each pass of prompt reading
    read_pass = DecodeEngine._read_pass

    def counting_pass(engine: DecodeEngine, prefill: Any) -> Any:
        passes.append(min(PREFILL_CHUNK_TOKENS, len(prefill.request.prompt_ids) - prefill.read))
        return read_pass(engine, prefill)

    monkeypatch.setattr(DecodeEngine, "_read_pass", counting_pass)
    progress: asyncio.Queue[int] = asyncio.Queue()
    running = asyncio.create_task(reply(service, running_prompt, GenerationParams(64, 0.0, 1.0), progress=progress))
    while await progress.get() < 5:
        pass
    passes.clear()

    repeated = await reply(service, repeated_prompt, GenerationParams(24, 0.0, 1.0))

    assert not running.done() and passes == []  # it joined the batch's steps with its last prompt token
    assert repeated.finished.prompt_tokens == len(repeated_prompt.token_ids)
    assert repeated.text.startswith(decode(service, generate_ids(service, repeated_prompt, EXACT_PREFIX_TOKENS)[:24]))
    assert (await running).text.startswith(decode(service, generate_ids(service, running_prompt, EXACT_PREFIX_TOKENS)))


async def test_cancelling_one_reply_leaves_the_others_intact(service: ModelService, batch_sizes: list[int]) -> None:
    prompts = [prompt(service, question) for question in QUESTIONS[:3]]
    long = GenerationParams(64, 0.0, 1.0)
    stop_second = threading.Event()
    second_progress: asyncio.Queue[int] = asyncio.Queue()

    async def read_third_then_leave() -> int:
        """Read a few deltas, then close the stream as a client that goes away does."""
        stream = service.stream(prompts[2], long, threading.Event())
        count = 0
        async for output in stream:
            count += isinstance(output, TextDelta)
            if count == 5:
                break
        await stream.aclose()  # type: ignore[attr-defined]
        return count

    tasks = [
        asyncio.create_task(reply(service, prompts[0], long)),
        asyncio.create_task(reply(service, prompts[1], long, cancelled=stop_second, progress=second_progress)),
    ]
    leaver = asyncio.create_task(read_third_then_leave())
    while await second_progress.get() < 5:
        pass
    stop_second.set()
    deltas_at_cancel = second_progress.qsize() + 5
    first, second = await asyncio.gather(*tasks)
    await leaver

    assert second.finished.finish_reason == "cancelled"
    # Cancelled within about one decode step: a token or two were on their way, not the other ~55.
    assert len(second.deltas) <= deltas_at_cancel + 2
    assert second.finished.completion_tokens < 16
    assert first.finished.finish_reason in {"length", "stop"} and first.finished.completion_tokens > 16
    assert first.text.startswith(decode(service, generate_ids(service, prompts[0], EXACT_PREFIX_TOKENS)))
    assert max(batch_sizes) == 3 and batch_sizes[-1] == 1  # both left the batch; the first one ran on alone


async def test_each_request_keeps_its_own_limits_and_finish_reason(service: ModelService) -> None:
    short_answer = prompt(service, "Reply with only the word yes.")
    expected_short = generate_ids(service, short_answer, 40)
    assert expected_short[-1] == service.tokenizer.eos_token_id and len(expected_short) < 40  # the model stops

    one, seven, stops, sampled = await asyncio.gather(
        reply(service, prompt(service, QUESTIONS[0]), GenerationParams(1, 0.0, 1.0)),
        reply(service, prompt(service, QUESTIONS[1]), GenerationParams(7, 0.0, 1.0)),
        reply(service, short_answer, GenerationParams(40, 0.0, 1.0)),
        reply(service, prompt(service, QUESTIONS[2]), GenerationParams(12, 1.0, 0.9, seed=3)),
    )

    assert (one.finished.finish_reason, one.finished.completion_tokens) == ("length", 1)
    assert (seven.finished.finish_reason, seven.finished.completion_tokens) == ("length", 7)
    assert (stops.finished.finish_reason, stops.finished.completion_tokens) == ("stop", len(expected_short))
    assert stops.text == decode(service, expected_short)
    assert (sampled.finished.finish_reason, sampled.finished.completion_tokens) == ("length", 12)
    again = await reply(service, prompt(service, QUESTIONS[2]), GenerationParams(12, 1.0, 0.9, seed=3))
    assert again.text == sampled.text  # a seed makes a sampled reply repeatable, alone or in a batch


async def test_a_request_cancelled_before_it_starts_finishes_at_once(service: ModelService) -> None:
    cancelled = threading.Event()
    cancelled.set()
    got = await reply(service, prompt(service, QUESTIONS[0]), cancelled=cancelled)
    assert got.deltas == []
    assert got.finished.finish_reason == "cancelled" and got.finished.completion_tokens == 0


async def test_the_next_turn_prefills_only_what_the_last_turn_did_not_feed(
    service: ModelService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A conversation's second turn starts from the first turn's keys and values: same reply, far less prefill."""
    turns = [ChatTurn("user", "Tell me about the moon, in a few sentences. Reply as a poet.")]
    first = await reply(service, service.build_prompt(None, turns, 64))
    turns += [ChatTurn("assistant", first.text), ChatTurn("user", "And the sun?")]
    second_prompt = service.build_prompt(None, turns, 64)

    fed = record_prompt_passes(monkeypatch)
    second = await reply(service, second_prompt)

    new_tokens = (
        len(second_prompt.token_ids)
        - len(prompt(service, turns[0].content).token_ids)
        - first.finished.completion_tokens
    )
    assert fed[0] < new_tokens + 8  # only the closing of the first reply and the new question
    assert second.text.startswith(decode(service, generate_ids(service, second_prompt, EXACT_PREFIX_TOKENS)))


async def test_the_next_turn_holds_a_reply_in_the_ids_the_model_wrote_it_in(
    service: ModelService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Models often spell a word otherwise than their tokenizer would ("Lavgol" here): tokenized anew, the reply
    in the next turn's prompt would part from the keys and values the prefix cache keeps for it at that word, and
    the rest of the reply would be read again. Its own ids are kept instead: the next turn reads only the reply's
    closing and the new question, and answers as plain generate on that prompt."""
    monkeypatch.setattr(engine_module, "READ_AHEAD_AFTER_SECONDS", 60.0)  # the next turn comes at once
    turns = [ChatTurn("user", "What is the Elvish word for bread?")]
    first_prompt = service.build_prompt(None, turns, 64)
    *written, stop = generate_ids(service, first_prompt, 64)  # 'The Elvish word for bread is "Lavgol."'
    assert stop == service.tokenizer.eos_token_id and service.tokenizer.encode(decode(service, written)) != written
    first = await reply(service, first_prompt, replace(GREEDY, max_new_tokens=64))
    turns += [ChatTurn("assistant", first.text), ChatTurn("user", "And the word for water?")]
    second_prompt = service.build_prompt(None, turns, 64)

    fed = record_prompt_passes(monkeypatch)
    second = await reply(service, second_prompt)

    cached = len(first_prompt.token_ids) + first.finished.completion_tokens - 1  # all but its stop token
    assert second_prompt.token_ids[:cached] == first_prompt.token_ids + written
    assert fed == [len(second_prompt.token_ids) - cached]
    assert second.text.startswith(decode(service, generate_ids(service, second_prompt, EXACT_PREFIX_TOKENS)))


@pytest.mark.parametrize("ending", ["stop", "length"])
async def test_a_quiet_engine_reads_the_next_turn_opening_ahead(
    service: ModelService, monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    """While the user reads a reply, the engine reads what the next turn's prompt holds after it and before their
    next message (the reply's last token where it ended at its length limit, then the template's opening of a user
    turn): the next turn reads only the message and the reply's opening, and answers as plain generate."""
    monkeypatch.setattr(engine_module, "READ_AHEAD_AFTER_SECONDS", 0.01)
    opening = next_turn_opening(service.tokenizer)
    assert service.tokenizer.decode(opening) == "\nuser\n"  # <|im_end|>\n<|im_start|>user\n without the specials
    turns = [ChatTurn("user", "Name a fruit.")]  # its reply's text is tokenized again as the model wrote it
    first_prompt = service.build_prompt(None, turns, 64)
    first = await reply(service, first_prompt, GenerationParams(64 if ending == "stop" else 6, 0.0, 1.0))
    assert first.finished.finish_reason == ending
    await asyncio.sleep(0.5)  # the user reads
    turns += [ChatTurn("assistant", first.text), ChatTurn("user", "Thanks. And now to the moon?")]
    second_prompt = service.build_prompt(None, turns, 64)

    fed = record_prompt_passes(monkeypatch)
    second = await reply(service, second_prompt)

    read_ahead = len(first_prompt.token_ids) + first.finished.completion_tokens + len(opening)
    if ending == "stop":
        read_ahead -= 1  # the reply's end token is the opening's first
    assert fed == [len(second_prompt.token_ids) - read_ahead]
    assert second.text.startswith(decode(service, generate_ids(service, second_prompt, EXACT_PREFIX_TOKENS)))


async def test_a_reply_stopped_while_its_prompt_is_read_keeps_what_was_read(
    service: ModelService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reply stopped before its first token, while a long prompt is still being read, leaves the keys and values
    read so far in the prefix cache (with any entry its prompt took over): the same message sent again reads only
    the rest."""
    asked = prompt(
        service, " ".join(["The harbour committee met on a rainy Tuesday."] * 30), system=f"Test {time.time()}"
    )
    assert len(asked.token_ids) > 3 * PREFILL_CHUNK_TOKENS
    cancelled = threading.Event()
    fed = record_prompt_passes(monkeypatch, after_each=cancelled.set)  # the first reply's: the next has its own

    stopped = await reply(service, asked, cancelled=cancelled)
    read, fed[:] = sum(fed), []
    again = await reply(service, asked, replace(GREEDY, max_new_tokens=1))

    assert stopped.finished.finish_reason == "cancelled" and stopped.deltas == []
    assert read == PREFILL_CHUNK_TOKENS  # one pass, then the stop
    assert again.finished.completion_tokens == 1 and 0 < sum(fed) <= len(asked.token_ids) - read


async def test_a_prompt_sharing_only_its_opening_with_a_cached_one_is_plain_generate(
    service: ModelService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new conversation starts from another's cached opening (the chat template's system prompt). Its own tokens,
    more than those cached, attend causally without a mask; the reply is still plain generate's."""
    await reply(service, prompt(service, "Hello!"))
    asked = prompt(
        service,
        "Describe a small fishing harbour at dawn: the boats coming back, the gulls, the nets drying on the quay, "
        "the smell of salt and diesel, and the people who meet the boats to buy the night's catch.",
    )
    fed = record_prompt_passes(monkeypatch)
    got = await reply(service, asked)

    cached = len(asked.token_ids) - fed[0]
    assert 0 < cached < fed[0]  # a prefix was reused, and it is shorter than what was fed
    assert got.text.startswith(decode(service, generate_ids(service, asked, EXACT_PREFIX_TOKENS)))


async def test_float16_keys_and_values_take_half_the_memory_for_the_same_reply(service: ModelService) -> None:
    """CHIPI_KV_CACHE_DTYPE: the default float16 keeps a reply's keys and values in half float32's bytes (so the
    prefix cache holds twice the conversation), and the greedy reply is the one a float32 cache gives."""
    model = service.model
    if not isinstance(model, LlamaForward) or not kernels.available():
        pytest.skip("float16 keys and values are kept where Chipi's kernels attend")
    the_prompt = prompt(service, QUESTIONS[3])
    replies: dict[str, str] = {}
    cached_bytes: dict[str, int] = {}
    try:
        for setting in ("float32", "float16"):
            model.keep_keys_values_in(setting)
            with_cache = ModelService(
                model,
                service.tokenizer,
                name=service.name,
                context_window=service.context_window,
                prefix_cache_bytes=2**30,
            )
            try:
                replies[setting] = (await reply(with_cache, the_prompt)).text
            finally:
                with_cache.close()  # the engine stores a finished reply's keys and values just after its last token
            assert with_cache._engine._prefix_cache is not None
            cached_bytes[setting] = with_cache._engine._prefix_cache.size_bytes
    finally:
        model.keep_keys_values_in(Settings.from_env().kv_cache_dtype)
    assert replies["float16"] == replies["float32"]
    assert cached_bytes["float16"] * 2 == cached_bytes["float32"] > 0


@pytest.mark.parametrize(
    ("dtype", "quantize", "activation_bits", "kv_cache_dtype"),
    [
        ("auto", "auto", 16, "float16"),
        ("auto", "auto", 16, "float32"),
        ("auto", "auto", 8, "float16"),
        ("float32", "none", 16, "float16"),
        ("float16", "none", 16, "float16"),
        ("float32", "int8", 16, "float16"),
        ("float32", "int4", 16, "float32"),
    ],
)
async def test_every_precision_answers_a_plain_question(
    dtype: str, quantize: str, activation_bits: int, kv_cache_dtype: str
) -> None:
    """Each CHIPI_DTYPE / CHIPI_QUANTIZE / CHIPI_ACTIVATION_BITS / CHIPI_KV_CACHE_DTYPE the README documents loads and
    answers on the CPU."""
    if (quantize in ("int8", "int4") or activation_bits == 8) and not kernels.available():
        pytest.skip(f"CHIPI_QUANTIZE={quantize} needs Chipi's CPU kernels: {kernels.unavailable_reason()}")
    settings = replace(
        Settings.from_env(),
        dtype=dtype,
        quantize=quantize,
        activation_bits=activation_bits,
        kv_cache_dtype=kv_cache_dtype,
        prefix_cache_mb=0,
    )
    model = ModelService.load(settings)
    try:
        question = prompt(model, "What is the capital of France?")
        answer = await reply(model, question, GenerationParams(max_new_tokens=24, temperature=0.0, top_p=1.0))
    finally:
        model.close()
    assert answer.finished.finish_reason in ("stop", "length")
    assert "Paris" in answer.text, answer.text


# How far the served model's logits may be from plain transformers' on the same weights: float rounding for float32's
# packed layers; the block kernels also round each block of activations to 16 bits (relative error under 2e-5), which
# turns any last-bit difference upstream into logits up to about 1e-2 apart: over 16 other questions the largest
# difference was 0.005-0.010 (median 0.0068) with PyTorch's prompt attention and 0.005-0.011 (median 0.0064) with
# Chipi's prompt_attention, which agree with each other to float32 rounding.
LOGIT_TOLERANCE = {"none": 1e-3, "auto": 1.5e-2}


@pytest.mark.parametrize("quantize", ["none", "auto"])
def test_the_served_model_answers_like_plain_transformers(quantize: str) -> None:
    """Whatever its layers (oneDNN's packed float32, or 4- and 8-bit blocks holding the default model's own GGUF
    weights), the served model computes plain transformers' function on the checkpoint: the same logits up to
    rounding, and the same greedy answers."""
    if quantize == "auto" and not kernels.available():
        pytest.skip(f"Chipi's CPU kernels are not available: {kernels.unavailable_reason()}")
    service = ModelService.load(replace(Settings.from_env(), dtype="float32", quantize=quantize, prefix_cache_mb=0))
    plain = plain_model(service.name)
    try:
        layers = list(service.model.modules())
        if quantize == "auto":  # the default model came from Q4_1 / Q8_0 blocks: it goes back into them, exactly
            assert {layer.bits for layer in layers if isinstance(layer, BlockLinear)} == {4, 8}
            lm_head = service.model.lm_head
            assert torch.equal(lm_head.dequantized(), plain.lm_head.weight)
            assert torch.equal(service.model.layers[3].down.dequantized(), plain.model.layers[3].mlp.down_proj.weight)
        elif onednn_packs_linears():
            assert any(isinstance(layer, PackedLinear) for layer in layers)
        for question in QUESTIONS:
            the_prompt = prompt(service, question)
            input_ids = torch.tensor([the_prompt.token_ids])
            with torch.inference_mode():
                plain_logits = plain(input_ids=input_ids).logits[0, -1]
            served_logits = last_logits(service, the_prompt.token_ids)
            assert torch.allclose(served_logits, plain_logits, atol=LOGIT_TOLERANCE[quantize], rtol=0), question
            expected = generate_ids(service, the_prompt, EXACT_PREFIX_TOKENS)
            served = asyncio.run(reply(service, the_prompt, GenerationParams(EXACT_PREFIX_TOKENS, 0.0, 1.0)))
            assert served.text == decode(service, expected), question
    finally:
        service.close()


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("padded", [False, True])
def test_a_decode_step_in_one_kernel_call_is_the_step_layer_by_layer(
    service: ModelService, monkeypatch: pytest.MonkeyPatch, padded: bool, cache_dtype: torch.dtype
) -> None:
    """A decode step of a model in blocks runs all its layers in one call of Chipi's kernels (decode_layers). Over a
    few steps of two rows (one left-padded, or both the same length) it gives the logits of the same forward run
    operation by operation, and the same greedy tokens. Up to rounding: the block kernels round activations to 16
    bits, so last-bit differences upstream move logits by up to about 1e-2, and each path is that close to plain
    transformers' decode (measured: 0.009 and 0.007 over 6 steps), so within twice that of the other."""
    model = service.model
    if not isinstance(model, LlamaForward) or model._step is None:
        pytest.skip("the served model is not in blocks here")
    questions = [QUESTIONS[0], QUESTIONS[1] if padded else QUESTIONS[0]]
    prompts = [prompt(service, question).token_ids for question in questions]
    width = max(len(ids) for ids in prompts)
    with torch.inference_mode():
        rows = []
        for ids in prompts:  # each prefilled alone, then left-padded to the longer one, as the engine batches them
            prefilled = DynamicCache()
            model(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                position_ids=torch.arange(len(ids))[None],
                cache=prefilled,
            )
            pad = width - len(ids)
            rows.append(
                [
                    (functional.pad(layer.keys, (0, 0, pad, 0)), functional.pad(layer.values, (0, 0, pad, 0)))
                    for layer in prefilled.layers
                ]
            )
        key_values = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(*rows, strict=True)]
        start_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts])

        def steps() -> torch.Tensor:
            cache, mask = spare_room_cache(key_values, cache_dtype), start_mask
            tokens, logits = torch.tensor([[ids[-1]] for ids in prompts]), []
            for step in range(6):
                mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
                positions = torch.tensor([[len(ids) + step] for ids in prompts])
                logits.append(model(input_ids=tokens, attention_mask=mask, position_ids=positions, cache=cache))
                tokens = logits[-1].argmax(-1, keepdim=True)
            return torch.stack(logits)

        in_one_call = steps()
        monkeypatch.setattr(model, "_step", None)
        layer_by_layer = steps()
    assert torch.allclose(in_one_call, layer_by_layer, atol=2e-2, rtol=0)
    assert torch.equal(in_one_call.argmax(-1), layer_by_layer.argmax(-1))
