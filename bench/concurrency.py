"""Aggregate decode speed of concurrent replies, in-process, through ModelService.stream.

    python -m bench.concurrency [--rounds 2] [--max-tokens 128] [--streams 1,2,4,8] [--temperature 0 --top-p 1]

Prints one table: for N streams started together (greedy unless --temperature says otherwise; the same prompt set
every time), the tokens all of
them produced per second of wall time, as a ratio to the single-stream figure of this same run, and the time to
first token (median and max over the streams). A plain `model.generate` of the first prompt is measured alongside,
interleaved with the rounds, as the reference a lone request must keep up with (before the batched engine, a
reply was exactly that `generate` call, run one at a time); "x generate" is each row's rate over it. Every figure
is a median over the rounds; the machine's other load hits all rows alike because rounds of all sizes alternate.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
from dataclasses import dataclass

import torch

from app.assets import ensure_default_model
from app.domain.generation import ChatTurn, GenerationFinished, GenerationParams, Prompt, TextDelta
from app.services.model import ModelService
from app.settings import Settings
from bench.baseline import plain_generate

PROMPTS = [
    "Write a long story about a dragon who learns to bake bread.",
    "Explain in detail how rainbows form.",
    "List ten fruits and describe each one.",
    "Tell me about the history of Paris.",
    "Write a long poem about the sea.",
    "Describe how a computer works to a child.",
    "Give me a detailed recipe for pancakes.",
    "Why is the sky blue? Explain it step by step.",
]


@dataclass
class StreamRun:
    tokens: int
    first_token_seconds: float


@dataclass
class Round:
    tokens: int
    seconds: float
    first_tokens: list[float]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


async def one_stream(model: ModelService, prompt: Prompt, params: GenerationParams) -> StreamRun:
    started = time.perf_counter()
    first_token: float | None = None
    async for output in model.stream(prompt, params, threading.Event()):
        if isinstance(output, TextDelta) and first_token is None:
            first_token = time.perf_counter() - started
        elif isinstance(output, GenerationFinished):
            return StreamRun(output.completion_tokens, first_token or time.perf_counter() - started)
    raise RuntimeError("the stream ended without GenerationFinished")


async def one_round(model: ModelService, prompts: list[Prompt], streams: int, params: GenerationParams) -> Round:
    """`streams` replies started together, each to its own prompt of `prompts`."""
    started = time.perf_counter()
    runs = await asyncio.gather(*(one_stream(model, prompts[i % len(prompts)], params) for i in range(streams)))
    return Round(sum(r.tokens for r in runs), time.perf_counter() - started, [r.first_token_seconds for r in runs])


def plain_generate_rate(model: ModelService, prompt: Prompt, max_tokens: int) -> float:
    """Tokens/s of a bare `model.generate` of one prompt: what a lone request used to get."""
    tokens, seconds = plain_generate(model, prompt, max_tokens)
    return tokens / seconds


async def measure(args: argparse.Namespace) -> None:
    settings = Settings.from_env()
    ensure_default_model(settings)
    model = ModelService.load(settings)
    prompts = [model.build_prompt(None, [ChatTurn("user", text)], args.max_tokens) for text in PROMPTS]
    sizes = [int(size) for size in args.streams.split(",")]
    params = GenerationParams(args.max_tokens, args.temperature, args.top_p)
    await one_round(model, prompts, max(sizes), GenerationParams(8, args.temperature, args.top_p))  # warm-up
    plain_generate_rate(model, prompts[0], 8)

    rounds: dict[int, list[Round]] = {size: [] for size in sizes}
    generate_rates: list[float] = []
    for _ in range(args.rounds):
        generate_rates.append(plain_generate_rate(model, prompts[0], args.max_tokens))
        for size in sizes:
            rounds[size].append(await one_round(model, prompts, size, params))
    model.close()

    rate = {size: statistics.median(r.tokens_per_second for r in runs) for size, runs in rounds.items()}
    base = rate[sizes[0]]
    generate_rate = statistics.median(generate_rates)
    decoding = "greedy" if args.temperature <= 0 else f"temperature {args.temperature}, top-p {args.top_p}"
    print(
        f"\nChipi concurrent decoding ({torch.get_num_threads()} torch threads, {model.device}, {settings.model}; "
        f"{decoding}, up to {args.max_tokens} tokens per stream, median of {args.rounds} rounds)"
    )
    print(
        f"  {'streams':>7}  {'tokens':>6}  {'tokens/s':>8}  {'ratio':>6}  {'x generate':>10}"
        f"  {'TTFT median':>11}  {'TTFT max':>8}"
    )
    for size in sizes:
        runs = rounds[size]
        tokens = statistics.median(r.tokens for r in runs)
        ttft_median = statistics.median(statistics.median(r.first_tokens) for r in runs)
        ttft_max = statistics.median(max(r.first_tokens) for r in runs)
        print(
            f"  {size:>7}  {tokens:>6.0f}  {rate[size]:>8.1f}  {rate[size] / base:>5.2f}x"
            f"  {rate[size] / generate_rate:>9.2f}x  {ttft_median * 1000:>8.0f} ms  {ttft_max * 1000:>5.0f} ms"
        )
    print(f"  ratio: to {sizes[0]} stream(s) above; x generate: to a plain model.generate of one prompt, alone")
    print(f"  plain model.generate, 1 stream: {generate_rate:.1f} tokens/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--streams", default="1,2,4,8", help="comma-separated stream counts; the first is the base")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; the server's default is 0.2")
    parser.add_argument("--top-p", type=float, default=1.0, help="the server's default is 0.9")
    asyncio.run(measure(parser.parse_args()))


if __name__ == "__main__":
    main()
